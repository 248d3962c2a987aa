"""Settings of the uvicorn server the chat browser tests run (``chat_server`` in conftest.py):
Rivya's own, with static files served from the source folders (whitenoise's finders), as the
live server serves them; nothing runs collectstatic before the tests."""

from rivya.settings import *  # noqa: F403

WHITENOISE_USE_FINDERS = True
