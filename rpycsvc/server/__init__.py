"""The server side: the RPyC service, the worker pool and its workers, hosted objects,
endpoints, metrics."""
