"""The app of the GPU workers: ``celery -A demo_app.apps.gpu worker``."""

from demo_app.celery import make_app

app = make_app(__name__)
