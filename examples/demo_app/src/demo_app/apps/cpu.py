"""The app of the CPU workers: ``celery -A demo_app.apps.cpu worker``."""

from demo_app.celery import make_app

app = make_app(__name__)
