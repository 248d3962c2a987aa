"""Settings of the uvicorn server the chat browser tests run (``chat_server`` in conftest.py):
Rivya's own, with static files served from the source folders (whitenoise's finders), as the
live server serves them; nothing runs collectstatic before the tests. Its password hashers are
the test process's (``pytest_configure`` in the root conftest.py: the users a test makes there
log in here), with the production one kept for users this server makes itself."""

from rivya.settings import *  # noqa: F403

WHITENOISE_USE_FINDERS = True
PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.MD5PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
]
