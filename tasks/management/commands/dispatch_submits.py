from __future__ import annotations

import signal
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from tasks.services.dispatch import dispatch_all, run_dispatcher


class Command(BaseCommand):
    help = (
        "Hand submitted tasks to the Celery worker as soon as they are committed (the outbox "
        "dispatcher; runs until stopped). --once empties the outbox and exits."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="empty the outbox and exit")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["once"]:
            self.stdout.write(f"dispatch_submits: {dispatch_all()} task(s) queued.")
            return
        stopping: list[int] = []

        def stop(signum: int, frame: Any) -> None:
            stopping.append(signum)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.stdout.write("dispatch_submits: handing submitted tasks to the worker.")
        run_dispatcher(lambda: bool(stopping))
