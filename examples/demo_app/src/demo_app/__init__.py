"""Demo Celery app for celery-fleet.

Run it with ``celery --app demo_app worker``. The broker and result backend
come from the environment (``CELERY_BROKER_URL``, ``CELERY_RESULT_BACKEND``),
which Celery reads natively, so no secret is ever written into code or argv.
"""

from demo_app.celery import app

__all__ = ["app"]
