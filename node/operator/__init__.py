"""The operator's view of a node: the status page, its JSON API and
console output.
"""
