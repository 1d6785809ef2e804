"""The node's SQLite store: schema and migrations, the node store, the job store."""
