"""Rivya settings: one module, driven by environment variables (django-environ).

Every knob has a safe development default; with ``DEBUG`` off the process refuses to start
without its secrets. ``README.md`` lists every variable.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DEBUG", default=False)

SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set it (any long random string) or run with DEBUG=1 for "
            "development."
        )
    SECRET_KEY = "dev-only-insecure-key-never-use-in-production"  # noqa: S105

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])


def _served_url() -> str:
    """Where `make run` serves (RIVYA_HOST, RIVYA_PORT), as a URL this machine can call.

    SITE_URL, and so every callback URL handed to a provider, defaults to it: with only
    RIVYA_PORT changed, callbacks must still reach this server rather than port 8000.
    bin/dev.py checks at startup that CALLBACK_BASE_URL reaches it.
    """
    host = env.str("RIVYA_HOST", default="127.0.0.1")
    # A wildcard bind is not an address to call: the loopback reaches it.
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{env.str('RIVYA_PORT', default='8000')}"


SERVE_URL = _served_url()
SITE_URL = env.str("SITE_URL", default=SERVE_URL)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "rivya",
    "billing",
    "tasks",
    "chat",
    "notifications",
]

MIDDLEWARE = [
    "rivya.middleware.RequestSizeLimitMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "rivya.middleware.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "rivya.urls"
WSGI_APPLICATION = "rivya.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "rivya.pages.context.header",
            ],
        },
    },
]

# --- database -------------------------------------------------------------------------------
# PostgreSQL when DATABASE_URL is set (production, tests); otherwise an embedded SQLite file that
# needs no server. SQLite runs in WAL mode with a busy timeout and IMMEDIATE transactions so that
# concurrent writers queue instead of failing with "database is locked"; correctness never relies
# on select_for_update (a no-op there) but on conditional UPDATEs.
VAR_DIR.mkdir(exist_ok=True)
DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'rivya.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
else:
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DB_CONN_MAX_AGE", default=60))
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_USER_MODEL = "rivya.User"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "home"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)
STATICFILES_DIRS = [BASE_DIR / "static"]
MEDIA_ROOT = env.path("MEDIA_ROOT", default=str(VAR_DIR / "media"))
MEDIA_URL = "media/"
# Where uploads, datasets and results are stored (docs/storage.md): the filesystem under
# MEDIA_ROOT by default; S3, Google Cloud Storage or Azure Blob Storage through django-storages
# (install the extra: pip install -e '.[s3]', '.[gcs]' or '.[azure]'), with the backend's options
# as JSON in STORAGE_OPTIONS (e.g. {"bucket_name": "rivya-media", "region_name": "eu-west-1"})
# and its credentials from the environment as the vendor's SDK reads them.
STORAGE_BACKENDS = {
    "filesystem": "django.core.files.storage.FileSystemStorage",
    "s3": "storages.backends.s3.S3Storage",
    "gcs": "storages.backends.gcloud.GoogleCloudStorage",
    "azure": "storages.backends.azure_storage.AzureStorage",
}
STORAGE_BACKEND = env.str("STORAGE_BACKEND", default="filesystem")
if STORAGE_BACKEND not in STORAGE_BACKENDS:
    raise ImproperlyConfigured(f"STORAGE_BACKEND must be one of {', '.join(STORAGE_BACKENDS)}.")
STORAGES = {
    "default": {
        "BACKEND": STORAGE_BACKENDS[STORAGE_BACKEND],
        "OPTIONS": env.json("STORAGE_OPTIONS", default={}),
    },
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
if DEBUG:
    STORAGES["staticfiles"] = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}

# --- cache ----------------------------------------------------------------------------------
# Redis when REDIS_URL is set; otherwise the database (works across processes, needs no server).
REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": "rivya_cache",
        }
    }

# --- Celery ---------------------------------------------------------------------------------
# Redis when CELERY_BROKER_URL is set; otherwise kombu's filesystem transport under var/, which
# works across processes on one machine.
BROKER_DIR = Path(env.str("BROKER_DIR", default=str(VAR_DIR / "broker")))
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    for sub in ("queue", "processed", "control"):
        (BROKER_DIR / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
    }
else:
    # Redis redelivers an unacknowledged message after the visibility timeout; keep it above
    # the longest countdown we ever use (else that task runs again and again) and make every
    # task idempotent.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_TASK_IGNORE_RESULT = True
# Outbound webhook deliveries wait on receivers the users chose (up to WEBHOOK_TIMEOUT_SECONDS
# each): they run on a queue of their own, served by a worker of their own (`make run` starts
# it), so that a slow receiver never delays a generation (docs/webhooks.md).
CELERY_TASK_ROUTES = {"notifications.deliver_webhook": {"queue": "webhooks"}}
CELERY_RESULT_BACKEND = None
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Keep database connections across tasks (see rivya/celery.py: connections are closed as in a
# web request instead: broken, mid-transaction or older than CONN_MAX_AGE). Celery's fix-up
# reads this name as it stands (not through the CELERY_ namespace).
CELERY_DB_REUSE_MAX = env.int("CELERY_DB_REUSE_MAX", default=8)
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TASK_ALWAYS_EAGER = False
# Periodic jobs, declared in code (the database scheduler picks them up). Each is safe to run
# twice or concurrently, as with a second beat (SKIP LOCKED batches, conditional UPDATEs).
CELERY_BEAT_SCHEDULE = {
    "poll-due-tasks": {
        "task": "tasks.poll_due",
        "schedule": env.float("TASK_POLL_EVERY", default=2.0),
    },
    "reconcile-waiting-tasks": {
        "task": "tasks.reconcile_waiting",
        "schedule": env.float("TASK_RECONCILE_EVERY", default=15.0),
    },
    "retry-pending-callbacks": {
        "task": "tasks.retry_pending_callbacks",
        "schedule": env.float("CALLBACK_RETRY_EVERY", default=30.0),
    },
    # Often enough that a short TASK_RESULT_TTL is honoured within a minute.
    "expire-results": {
        "task": "tasks.expire_results",
        "schedule": env.float("TASK_EXPIRE_EVERY", default=20.0),
    },
    "warn-expiring-results": {"task": "tasks.warn_expiring", "schedule": 60.0},
    "retry-upstream-cancels": {"task": "tasks.retry_upstream_cancels", "schedule": 120.0},
    "purge-idempotency-keys": {"task": "billing.purge_idempotency_keys", "schedule": 3600.0},
    # Files no row references (rolled-back submits, workers killed mid-outcome): docs/storage.md.
    "sweep-storage": {"task": "tasks.sweep_storage", "schedule": 3600.0},
    # Chat turns whose web process died mid-stream (docs/chat.md).
    "settle-abandoned-chat-turns": {"task": "chat.settle_abandoned", "schedule": 60.0},
    # Single tasks whose web process (or worker) died mid-run (docs/single.md).
    # Outbound webhooks whose queued delivery was lost, retries further ahead than a minute,
    # and messages held by a worker that died (docs/webhooks.md).
    "deliver-due-webhooks": {
        "task": "notifications.deliver_due_webhooks",
        "schedule": env.float("WEBHOOK_SWEEP_EVERY", default=15.0),
    },
    "purge-webhook-messages": {"task": "notifications.purge_webhook_messages", "schedule": 3600.0},
    "settle-interrupted-single-tasks": {
        "task": "tasks.settle_interrupted_single",
        "schedule": env.float("SINGLE_RECONCILE_EVERY", default=10.0),
    },
}

# --- DRF ------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rivya.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": [
        "rivya.parsers.JSONParser",
        "rest_framework.parsers.MultiPartParser",
        "rest_framework.parsers.FormParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "rivya.exceptions.api_exception_handler",
    "DEFAULT_PAGINATION_CLASS": "rivya.pagination.CursorPagination",
    "PAGE_SIZE": 50,
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    "DATETIME_FORMAT": "iso-8601",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Rivya API",
    "DESCRIPTION": "Generate images, video and audio, chat with language models, pay with credits.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI assets are served from our own static files: no CDN, works offline.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Two models have a Status: name each enum (the task's keeps its old name).
    "ENUM_NAME_OVERRIDES": {
        "StatusEnum": "tasks.models.Task.Status",
        "ChatMessageStatusEnum": "chat.models.ChatMessage.Status",
        "WebhookMessageStatusEnum": "notifications.models.WebhookMessage.Status",
    },
}

# --- product knobs --------------------------------------------------------------------------
SIGNUP_GRANT_CREDITS = env.str("SIGNUP_GRANT_CREDITS", default="10")
DEMO_USER_CREDITS = env.str("DEMO_USER_CREDITS", default="100")
MAX_REQUEST_BYTES = env.int("MAX_REQUEST_BYTES", default=100 * 1024 * 1024)
MAX_UPLOAD_BYTES = env.int("MAX_UPLOAD_BYTES", default=50 * 1024 * 1024)
MAX_IMAGE_PIXELS = env.int("MAX_IMAGE_PIXELS", default=40_000_000)
MAX_RESULT_BYTES = env.int("MAX_RESULT_BYTES", default=512 * 1024 * 1024)
# JSON bodies (not files) are read into memory: bound them well below MAX_REQUEST_BYTES.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("MAX_JSON_BYTES", default=5 * 1024 * 1024)
FILE_UPLOAD_HANDLERS = ["tasks.uploads.LimitedUploadHandler"]

# --- generation lifecycle -------------------------------------------------------------------
CALLBACKS_ENABLED = env.bool("CALLBACKS_ENABLED", default=True)
# Base URL providers call back to (must reach this server): defaults to SITE_URL.
CALLBACK_BASE_URL = env.str("CALLBACK_BASE_URL", default=SITE_URL).rstrip("/")
TASK_RESULT_TTL = env.int("TASK_RESULT_TTL", default=7 * 24 * 3600)
TASK_EXPIRY_WARNING = env.int("TASK_EXPIRY_WARNING", default=24 * 3600)

# Outbound webhooks (docs/webhooks.md). Private and loopback receivers, and plain http, only
# under DEBUG (as `make run` runs) unless set: production refuses both.
WEBHOOK_ALLOW_PRIVATE = env.bool("WEBHOOK_ALLOW_PRIVATE", default=DEBUG)
WEBHOOK_ALLOW_HTTP = env.bool("WEBHOOK_ALLOW_HTTP", default=DEBUG)
WEBHOOK_TIMEOUT_SECONDS = env.float("WEBHOOK_TIMEOUT_SECONDS", default=15.0)
WEBHOOK_MAX_RESPONSE_BYTES = env.int("WEBHOOK_MAX_RESPONSE_BYTES", default=8192)
WEBHOOK_SECRET_OVERLAP = timedelta(seconds=env.int("WEBHOOK_SECRET_OVERLAP", default=24 * 3600))
# Fault injection (rivya/faults.py, bench/chaos.py): empty, as in production, unless a run
# sets it for its worker.
FAULT_KILL_DIR = env.str("FAULT_KILL_DIR", default="")
WEBHOOK_MAX_ENDPOINTS = env.int("WEBHOOK_MAX_ENDPOINTS", default=20)
# Finished messages (with their attempts) are kept this long, then purged.
WEBHOOK_RETENTION = timedelta(seconds=env.int("WEBHOOK_RETENTION", default=30 * 24 * 3600))
WEBHOOK_DISABLE_AFTER = timedelta(seconds=env.int("WEBHOOK_DISABLE_AFTER", default=5 * 24 * 3600))
TASK_MAX_RUNNING_PER_USER = env.int("TASK_MAX_RUNNING_PER_USER", default=20)
TASK_MAX_RUNNING = env.int("TASK_MAX_RUNNING", default=500)
# Optional per-user limits per category, e.g. "video=3,image=10" (within the per-user limit).
TASK_MAX_RUNNING_PER_CATEGORY = {
    k: int(v) for k, v in env.dict("TASK_MAX_RUNNING_PER_CATEGORY", default={}).items()
}
TASK_SUBMIT_MAX_ATTEMPTS = env.int("TASK_SUBMIT_MAX_ATTEMPTS", default=6)
# A WAITING task not submitted for this long is handed to the submitter again.
TASK_RESUBMIT_AFTER = env.int("TASK_RESUBMIT_AFTER", default=30)
# The dispatcher (manage.py dispatch_submits) queues a committed task at once on PostgreSQL
# (LISTEN/NOTIFY); it also looks at the outbox this often (seconds), which is how it works on
# SQLite.
DISPATCH_POLL_S = env.float("DISPATCH_POLL_S", default=1.0)
TASK_POLL_BATCH = env.int("TASK_POLL_BATCH", default=200)
# A task past its model's timeout whose job the provider never confirms stopped (status checks
# failing, or a cancel it does not honour) is failed and refunded this long after it was flagged
# (timeout_unconfirmed): a day of silence is the provider's failure, not the user's.
TASK_UNCONFIRMED_GRACE = env.int("TASK_UNCONFIRMED_GRACE", default=24 * 3600)
# Attempts at storing a finished job's outputs that never ended (the worker died or hit its time
# limit, e.g. on a poison output) before the task fails, refunded, instead of looping forever.
TASK_OUTPUT_MAX_ATTEMPTS = env.int("TASK_OUTPUT_MAX_ATTEMPTS", default=5)
# The Studio asks to confirm a duplicate run (the same model and prompt already running, or
# failing again and again) when it is heavy: a video or audio model, or priced over this
# (micro-credits; default 5 credits).
STUDIO_HEAVY_PRICE_MICRO = env.int("STUDIO_HEAVY_PRICE_MICRO", default=5_000_000)
# The storage sweep deletes unreferenced files only once they are this old (s): far longer than
# any submit or outcome transaction that may be about to reference them (docs/storage.md).
STORAGE_SWEEP_MIN_AGE = env.int("STORAGE_SWEEP_MIN_AGE", default=24 * 3600)
# Chat (docs/chat.md): the longest a turn may stream before Rivya stops reading (and settles
# what it read); a turn still streaming a minute past this was abandoned by a dead server and
# is settled by the beat. At most this many earlier messages are considered for the context.
CHAT_TURN_MAX_SECONDS = env.int("CHAT_TURN_MAX_SECONDS", default=600)
CHAT_HISTORY_MAX_MESSAGES = env.int("CHAT_HISTORY_MAX_MESSAGES", default=200)
# Tool calls (chat/tools.py): the catalog model each tool generates with (a tool whose model is
# missing or disabled is not offered), how many calls of one message run, and how long a
# turn's stream waits for its tools' tasks to finish before it ends (the page and the API go
# on showing them live).
CHAT_TOOL_MODELS = {
    "generate_image": env.str("CHAT_TOOL_IMAGE_MODEL", default="sandbox-image"),
    "generate_video": env.str("CHAT_TOOL_VIDEO_MODEL", default="sandbox-video"),
    "generate_audio": env.str("CHAT_TOOL_AUDIO_MODEL", default="sandbox-speech"),
}
CHAT_MAX_TOOL_CALLS = env.int("CHAT_MAX_TOOL_CALLS", default=4)
CHAT_TOOL_WAIT_SECONDS = env.int("CHAT_TOOL_WAIT_SECONDS", default=120)
# Serving (rivya/asgi.py): threads per web worker process for everything but chat turns (each
# keeps a database connection), and chat turns being recorded at once per process (each needs
# a connection for that moment; more wait their turn). Together with the settling threads
# (asyncio's default executor), they bound a worker's PostgreSQL connections.
WEB_THREADS = env.int("WEB_THREADS", default=8)
CHAT_START_CONCURRENCY = env.int("CHAT_START_CONCURRENCY", default=8)
# Single (synchronous) tasks (docs/single.md): the longest a provider call may take inside a
# request, and in a worker (Prefer: respond-async); a task still running this margin past its
# budget was left by a dead process and is refunded by the beat (checked every
# SINGLE_RECONCILE_EVERY s). The database phases of single requests run on this many threads
# per web process (each keeps a connection; more requests wait their turn, holding nothing).
SINGLE_TASK_TIMEOUT_S = env.int("SINGLE_TASK_TIMEOUT_S", default=60)
SINGLE_ASYNC_TIMEOUT_S = env.int("SINGLE_ASYNC_TIMEOUT_S", default=900)
SINGLE_DEADLINE_MARGIN_S = env.int("SINGLE_DEADLINE_MARGIN_S", default=15)
SINGLE_RECONCILE_EVERY = env.float("SINGLE_RECONCILE_EVERY", default=10.0)
# A task accepted with Prefer: respond-async that no worker took this long after it was queued
# is queued again (its message may have been lost).
SINGLE_REQUEUE_AFTER_S = env.int("SINGLE_REQUEUE_AFTER_S", default=60)
SINGLE_DB_THREADS = env.int("SINGLE_DB_THREADS", default=8)

SANDBOX_URL = env.str("SANDBOX_URL", default="http://127.0.0.1:8765").rstrip("/")


def _sandbox_secret() -> str:
    """SANDBOX_WEBHOOK_SECRET, or one generated once and kept in var/ (shared with the sandbox
    process that `make run` starts)."""
    configured = env.str("SANDBOX_WEBHOOK_SECRET", default="")
    if configured:
        return configured
    import base64
    import secrets

    path = VAR_DIR / "sandbox_webhook_secret"
    if not path.exists():
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        try:
            with open(path, "x") as fh:  # "x": two processes starting at once keep one secret
                fh.write(secret)
        except FileExistsError:
            pass
    return path.read_text().strip()


SANDBOX_WEBHOOK_SECRET = _sandbox_secret()

# Routine work runs every few seconds with or without anything to do: its per-run Celery lines
# (beat's "Sending due task", the worker's "received"/"succeeded") are DEBUG, so that an idle
# INFO log holds what an operator acts on. Every periodic task is routine, and so is the
# per-task poll they fan out; their warnings and errors are kept.
LOG_ROUTINE_TASKS = sorted(
    {entry["task"] for entry in CELERY_BEAT_SCHEDULE.values()} | {"tasks.refresh"}
)
_routine = {"filters": ["routine_tasks"]}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "filters": {
        "routine_tasks": {"()": "rivya.logfilters.RoutineTaskFilter", "tasks": LOG_ROUTINE_TASKS}
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        # One line per upstream request is noise at INFO; failures surface as ProviderError logs.
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
        "celery.beat": _routine,
        "celery.worker.strategy": _routine,
        "celery.app.trace": _routine,
    },
}

if not DEBUG:
    SESSION_COOKIE_HTTPONLY = True
    CSRF_COOKIE_SECURE = env.bool("SECURE_COOKIES", default=False)
    SESSION_COOKIE_SECURE = env.bool("SECURE_COOKIES", default=False)

# --- single tasks ---------------------------------------------------------------------------
# Single (synchronous) tasks run inside the request; a gate bounds how many run at once across
# every web process and machine (tasks/single/gate.py). Beyond the limit a request waits up to
# SINGLE_GATE_WAIT_S seconds for a slot, then gets 429 with Retry-After. The gate lives in Redis
# ("auto" with REDIS_URL set) or in the database (GateSlot rows; "auto" without Redis): "redis"
# or "db" force one.
SINGLE_MAX_CONCURRENT = env.int("SINGLE_MAX_CONCURRENT", default=50)
SINGLE_GATE_WAIT_S = env.float("SINGLE_GATE_WAIT_S", default=2.0)
SINGLE_GATE_BACKEND = env.str("SINGLE_GATE_BACKEND", default="auto")
if SINGLE_GATE_BACKEND not in ("auto", "redis", "db"):
    raise ImproperlyConfigured("SINGLE_GATE_BACKEND must be auto, redis or db.")
