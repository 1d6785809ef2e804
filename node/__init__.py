"""The node: asyncio daemon, transports, store, executors, CLI. All I/O lives here."""
