"""``mercato``: the one console script, one module per user (provider, tenant,
cluster); ``main`` builds the parser.
"""
