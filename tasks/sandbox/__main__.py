"""``python -m tasks.sandbox [--host 127.0.0.1] [--port 8765] [--quiet]``.

The signing secret comes from ``SANDBOX_WEBHOOK_SECRET`` (a ``whsec_…`` value); without it a
random one is generated and printed, and callbacks will only verify where it is configured.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from types import FrameType

from standardwebhooks import Webhook

from tasks.sandbox.server import generate_secret, make_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.sandbox", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines")
    args = parser.parse_args(argv)

    secret = os.environ.get("SANDBOX_WEBHOOK_SECRET", "").strip()
    if not secret:
        secret = generate_secret()
        print(
            "sandbox: WARNING: SANDBOX_WEBHOOK_SECRET is not set; callbacks are signed with a "
            f"generated secret that Rivya does not know: {secret}",
            file=sys.stderr,
            flush=True,
        )
    try:
        Webhook(secret)
    except Exception as exc:
        print(
            f"sandbox: SANDBOX_WEBHOOK_SECRET is not a valid whsec_ secret: {exc}", file=sys.stderr
        )
        return 2

    server = make_server(args.host, args.port, secret, quiet=args.quiet)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"sandbox: listening on {server.sandbox.base_url}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
