"""Browser tests: Playwright driving Debian's Chromium (``/usr/bin/chromium``, never a
downloaded browser) against the live server, with the real Celery worker and beat and the
sandbox process of ``tests/e2e.py``.

Fixtures: ``browser`` (one Chromium per session), ``page`` (a fresh context per test, desktop
size), ``sign_up(page, name)`` and ``signed_up`` (a new user signed up through the signup page,
returning its username), ``chat_server`` (Rivya under uvicorn with the stack's environment,
once per session: chat streams need ASGI, and the live server is WSGI, which buffers them) and
``chat_page`` (a fresh context per test whose base URL is that server), and
``shoot(page, name)`` which saves a full-page screenshot at desktop and mobile widths under
``var/screenshots/`` (``make screenshots`` copies the chosen ones into ``docs/screenshots/``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "var" / "screenshots"
DESKTOP = {"width": 1280, "height": 900}
MOBILE = {"width": 390, "height": 844}
_users = itertools.count()


# Per module, not per session: while Playwright's sync API is started, this thread counts as
# running an event loop, and the other tests' asyncio.run() and async_to_sync() refuse to run
# (pytest-randomly puts modules in any order; it never mixes two modules' tests).
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread; Django refuses ORM calls from a
    # thread with a running loop unless told that is fine (these tests' own ORM calls are
    # synchronous). Only while a browser module runs: elsewhere the check keeps catching
    # database calls made from async code.
    with pytest.MonkeyPatch.context() as patch, sync_playwright() as playwright:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--autoplay-policy=no-user-gesture-required",
            ],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, e2e: Any, live_server: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=DESKTOP, base_url=live_server.url)
    context.set_default_timeout(15_000)
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture(scope="session")
def chat_server(stack: Any) -> Iterator[str]:
    """Rivya's ASGI application under uvicorn (as ``make run`` serves it) on the stack's
    database, broker and sandbox: its base URL. Sessions and CSRF cookies work on both servers
    (same database and SECRET_KEY)."""
    from tasks.tests.sandbox_process import stop_sandbox
    from tests.asgi_process import start_asgi

    env = dict(stack.env, DJANGO_SETTINGS_MODULE="tests.browser.asgi_settings")
    base_url, process = start_asgi(env, log=stack.logdir / "asgi-chat.log")
    try:
        yield base_url
    finally:
        stop_sandbox(process)


@pytest.fixture
def chat_page(browser: Any, e2e: Any, chat_server: str) -> Iterator[Any]:
    """A page (fresh context, desktop size) on the uvicorn server of ``chat_server``."""
    context = browser.new_context(viewport=DESKTOP, base_url=chat_server)
    context.set_default_timeout(15_000)
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture
def sign_up() -> Callable[[Any, str], None]:
    """Sign ``name`` up on ``page`` through the signup page (10 credits); it is then logged in."""

    def sign(page: Any, name: str) -> None:
        page.goto("/signup/")
        page.fill("#id_username", name)
        page.fill("#id_email", f"{name}@example.com")
        page.fill("#id_password1", "a-Long-pass-123")
        page.fill("#id_password2", "a-Long-pass-123")
        page.get_by_role("button", name="Create account").click()
        page.wait_for_url(lambda url: "/signup/" not in url)

    return sign


@pytest.fixture
def signed_up(page: Any, sign_up: Callable[[Any, str], None]) -> str:
    """A new user signed up through the signup page; the page is then logged in."""
    name = f"browser{os.getpid()}x{next(_users)}"
    sign_up(page, name)
    return name


@pytest.fixture
def shoot() -> Callable[[Any, str], None]:
    def take(page: Any, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        size = page.viewport_size
        for label, viewport in (("desktop", DESKTOP), ("mobile", MOBILE)):
            page.set_viewport_size(viewport)
            page.screenshot(path=str(SCREENSHOTS / f"{name}-{label}.png"), full_page=True)
        page.set_viewport_size(size)

    return take
