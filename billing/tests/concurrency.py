"""Run calls concurrently on real threads, each with its own database connection.

Only meaningful in ``django_db(transaction=True)`` tests; at most 50 threads at
once (PostgreSQL allows 100 connections here), and each thread closes its connection.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.db import connection

MAX_THREADS = 50


def run_concurrently(calls: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run every call, up to 50 at a time, each wave released together by a barrier.

    Returns, per call, its result or the exception it raised.
    """
    results: list[Any] = [None] * len(calls)
    width = min(MAX_THREADS, len(calls))
    for start in range(0, len(calls), width):
        wave = list(enumerate(calls))[start : start + width]
        barrier = threading.Barrier(len(wave))

        def run(index: int, call: Callable[[], Any], barrier: threading.Barrier = barrier) -> None:
            try:
                barrier.wait(timeout=30)
                results[index] = call()
            except Exception as exc:  # noqa: BLE001 - the caller inspects what each call did
                results[index] = exc
            finally:
                connection.close()

        with ThreadPoolExecutor(max_workers=len(wave)) as pool:
            list(pool.map(lambda pair: run(*pair), wave))
    return results
