"""The ASGI entry point, which ``make run`` serves (gunicorn with uvicorn workers) so that chat
streams hold no thread while they wait for tokens (docs/chat.md).

Under ASGI each request's database work runs in a thread of its own, so persistent connections
would pile up, one per thread: connections are closed at the end of each request
(``DB_CONN_MAX_AGE=0``) unless the environment says otherwise. bench/README.md measures what
that costs the rest of the API.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "rivya.settings")
os.environ.setdefault("DB_CONN_MAX_AGE", "0")
application = get_asgi_application()
