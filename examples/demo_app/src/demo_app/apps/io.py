"""The app of the I/O workers: ``celery -A demo_app.apps.io worker``."""

from demo_app.celery import make_app

app = make_app(__name__)
