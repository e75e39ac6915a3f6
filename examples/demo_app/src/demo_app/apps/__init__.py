"""Per-component apps: a fleet starts each component with its own module.

``celery -A demo_app.apps.gpu worker`` (likewise ``cpu`` and ``io``) for each
worker type and ``celery -A demo_app.apps.beat beat`` for beat. Each is
``make_app(<its module name>)``: the same broker, tasks, routes and schedule as
the base app ``demo_app``; only the app's name (``app.main``) differs, which the
``demo_app.tasks.whoami`` task and the tick's ``demo_sender_app`` header report.
"""
