"""The entry point ``make run`` serves (gunicorn with uvicorn workers), docs/chat.md.

Two ways in, one origin:
- a chat turn (``POST /api/v1/chat/sessions/<id>/messages/``) goes to Django's ASGI handler:
  its reply streams from a coroutine, so an open stream holds no thread and no database
  connection while it waits for tokens; the request lasts until the turns it started have
  settled (``wait_for_turns``), so a graceful restart lets them finish;
- so does a single task (``POST /api/v1/single/<type>/``, docs/single.md): it waits for its
  provider on the event loop, so up to SINGLE_MAX_CONCURRENT of them run at once without as
  many threads;
- everything else goes to Django's WSGI handler on a bounded pool of ``WEB_THREADS`` threads
  (a2wsgi), as gunicorn's gthread workers did: the threads live on, so their database
  connections persist (``CONN_MAX_AGE``) and their number is bounded. Under Django's ASGI
  handler every request would run in a new thread with a new connection; bench/README.md
  ("Chat streaming") measured that at a third of the throughput.
"""

from __future__ import annotations

import os
from typing import Any

from a2wsgi import WSGIMiddleware
from django.core.asgi import get_asgi_application
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "rivya.settings")
django_asgi = get_asgi_application()  # sets Django up

from django.conf import settings  # noqa: E402 - after setup
from django.urls import Resolver404, resolve  # noqa: E402

from chat.api.views import messages_view  # noqa: E402
from chat.streaming import wait_for_turns  # noqa: E402
from tasks.api.single import single_view  # noqa: E402

# The views served by Django's ASGI handler (async views that wait on the network).
ASYNC_VIEWS = (messages_view, single_view)

django_wsgi = WSGIMiddleware(get_wsgi_application(), workers=settings.WEB_THREADS)
streams = wait_for_turns(django_asgi)


def served_async(scope: Any) -> bool:
    """Whether this request is a chat turn or a single task, which the ASGI handler serves (the
    URLconf says which view answers the path)."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    try:
        return resolve(scope["path"]).func in ASYNC_VIEWS
    except Resolver404:
        return False


async def application(scope: Any, receive: Any, send: Any) -> None:
    if served_async(scope):
        await streams(scope, receive, send)
    else:
        await django_wsgi(scope, receive, send)  # also answers the lifespan protocol
