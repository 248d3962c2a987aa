#!/usr/bin/env bash
# Smoke test of `make run`'s embedded defaults on a throwaway SQLite database: migrate, seed twice
# (idempotent), serve a page and the API with the printed key, and check the ledger.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
export DEBUG=1 DATABASE_URL="sqlite:///$tmp/smoke.sqlite3"
unset CELERY_BROKER_URL REDIS_URL
py=.venv/bin/python
$py manage.py migrate --noinput -v0
$py manage.py createcachetable
$py manage.py seed_demo >/dev/null
out=$($py manage.py seed_demo)
key=$(printf '%s\n' "$out" | sed -n 's/^Demo API key: //p')
port=$((20000 + RANDOM % 20000))
$py -m gunicorn rivya.wsgi:application --bind 127.0.0.1:$port --workers 1 --log-level warning &
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.2; done
curl -fs "http://127.0.0.1:$port/login/" | grep -q "Log in"
credits=$(curl -fs -H "Authorization: Bearer $key" "http://127.0.0.1:$port/api/v1/credits/")
echo "$credits" | grep -q '"available":"100"' || { echo "unexpected credits: $credits"; exit 1; }
$py manage.py ledger_check
echo "smoke: ok ($credits)"
