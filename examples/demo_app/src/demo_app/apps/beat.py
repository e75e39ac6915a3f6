"""The app of beat, the periodic scheduler: ``celery -A demo_app.apps.beat beat``."""

from demo_app.celery import make_app

app = make_app(__name__)
