"""update-worker: UPDATE jobs from a Redis stream, applied exactly once through SQLAlchemy."""

__version__ = "0.1.0"
