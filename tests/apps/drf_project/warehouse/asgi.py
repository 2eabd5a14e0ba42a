"""ASGI entry point, as ``startproject`` writes it (this project is served by gunicorn, through wsgi.py)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "warehouse.settings")

application = get_asgi_application()
