"""Many inputs into one output: the driver, the worker's tasks, the ledger, the lock."""
