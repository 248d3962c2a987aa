"""One benchmark suite in a process of its own: ``python bench/suite.py CONFIG.json OUT.json``.

Started by ``bench/run.py`` for each suite (``holds``, ``submit``, ``callbacks``, ``latency``,
``scale``, ``chat``, ``single``, ``webhooks``): the process points Django at the suite's scratch
database, migrates it, runs the suite and writes its rows (``SuiteResult``) to ``OUT.json``.
Exit status 0 when the suite's checks passed, 1 when they did not (the rows are still written),
2 when it could not run. SIGTERM (the orchestrator giving up) or SIGINT (Ctrl-C) ends it through
the same clean-up as an error: the servers it started are stopped."""

from __future__ import annotations

import signal
import sys
import traceback
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SuiteConfig, SuiteResult, setup_django  # noqa: E402
from bench.scratch import url_with_db  # noqa: E402

SUITES = ("holds", "submit", "callbacks", "latency", "scale", "chat", "single", "webhooks")


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Stop once: a second signal must not interrupt the clean-up this one starts.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(f"suite stopped by signal {signum}")


def run_suite(config: SuiteConfig) -> SuiteResult:
    setup_django(url_with_db(config.url, config.database), config.database)
    if config.suite == "holds":
        from bench import holds

        return holds.run(config)
    if config.suite == "submit":
        from bench import submit

        return submit.run(config)
    if config.suite == "callbacks":
        from bench import finalize

        return finalize.run(config)
    if config.suite == "latency":
        from bench import latency

        return latency.run(config)
    if config.suite == "scale":
        from bench import scale

        return scale.run(config)
    if config.suite == "chat":
        from bench import chat

        return chat.run(config)
    if config.suite == "single":
        from bench import single

        return single.run(config)
    if config.suite == "webhooks":
        from bench import webhooks

        return webhooks.run(config)
    raise SystemExit(f"unknown suite {config.suite!r}; choose among {', '.join(SUITES)}")


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)  # Ctrl-C reaches the whole process group
    config = SuiteConfig.load(Path(argv[0]))
    try:
        result = run_suite(config)
    except Exception:
        traceback.print_exc()
        return 2
    finally:
        if "django" in sys.modules:
            from django.db import connections

            connections.close_all()
    result.dump(Path(argv[1]))
    for problem in result.problems:
        print(f"  PROBLEM: {problem}", flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
