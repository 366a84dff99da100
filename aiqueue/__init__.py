"""aiqueue: an admin CLI for a queue of paid AI jobs sent to RunningHub."""

__version__ = "0.1.0"
