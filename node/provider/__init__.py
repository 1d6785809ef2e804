"""The provider's side: the auction service, the task service, executors,
the sandbox, the inventory of devices.
"""
