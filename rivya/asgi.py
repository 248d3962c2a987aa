"""The ASGI entry point, which ``make run`` serves (gunicorn with uvicorn workers) so that chat
streams hold no thread while they wait for tokens (docs/chat.md).

Under ASGI each request's database work runs in a thread of its own, so persistent connections
would pile up, one per thread: connections are closed at the end of each request
(``DB_CONN_MAX_AGE=0``) unless the environment says otherwise. bench/README.md measures what
that costs the rest of the API.

A request is over when the chat turns it started have settled (``wait_for_turns``).
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "rivya.settings")
os.environ.setdefault("DB_CONN_MAX_AGE", "0")
django_application = get_asgi_application()

from chat.streaming import wait_for_turns  # noqa: E402 - needs Django set up first

# A request lasts until the chat turns it started have settled, so that a graceful restart
# lets them finish (docs/chat.md).
application = wait_for_turns(django_application)
