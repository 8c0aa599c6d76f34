"""``rpycsvc bench``: the workloads, the raw references they are compared with, and the report."""
