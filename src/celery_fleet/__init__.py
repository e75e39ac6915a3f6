"""Runtime helpers that celery-fleet installs on its hosts."""

__version__ = "0.1.0"
