#!/usr/bin/env bash
# Smoke test of `make run`'s embedded defaults (SQLite + filesystem broker, no server needed):
# migrate, seed twice (idempotent), start every process as `make run` does, then submit a
# generation through the API with the printed key and wait for it to succeed, and check the
# ledger. Ports and the database are throwaway.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
port=$((20000 + RANDOM % 20000))
sandbox_port=$((port + 1))
export DEBUG=1 DATABASE_URL="sqlite:///$tmp/smoke.sqlite3" MEDIA_ROOT="$tmp/media"
export RIVYA_PORT=$port SANDBOX_URL="http://127.0.0.1:$sandbox_port"
export CELERY_BROKER_URL="filesystem://" BROKER_DIR="$tmp/broker"
unset SITE_URL CALLBACK_BASE_URL  # derived from RIVYA_PORT, as `make run` does
export SANDBOX_WEBHOOK_SECRET="whsec_$(head -c 24 /dev/urandom | base64)"
unset REDIS_URL
py=.venv/bin/python
$py manage.py migrate --noinput -v0
$py manage.py createcachetable
$py manage.py seed_catalog >/dev/null
$py manage.py seed_catalog >/dev/null
$py manage.py seed_demo >/dev/null
out=$($py manage.py seed_demo)
key=$(printf '%s\n' "$out" | sed -n 's/^Demo API key: //p')
$py bin/dev.py >"$tmp/dev.log" 2>&1 &
pid=$!
base="http://127.0.0.1:$port"
for _ in $(seq 100); do curl -fs "$base/" >/dev/null 2>&1 && break; sleep 0.3; done
curl -fs "$base/login/" | grep -q "Log in"
credits=$(curl -fs -H "Authorization: Bearer $key" "$base/api/v1/credits/")
echo "$credits" | grep -q '"available":"100"' || { echo "unexpected credits: $credits"; exit 1; }
task=$(curl -fs -H "Authorization: Bearer $key" -H "Content-Type: application/json" \
  -d '{"model": "sandbox-image", "prompt": "smoke test"}' "$base/api/v1/tasks/")
poll=$(printf '%s' "$task" | $py -c 'import json,sys; print(json.load(sys.stdin)["poll_url"])')
status=""
for _ in $(seq 120); do
  status=$(curl -fs -H "Authorization: Bearer $key" "$base$poll" \
    | $py -c 'import json,sys; print(json.load(sys.stdin)["status"])')
  [ "$status" = "SUCCESS" ] && break
  case "$status" in FAILED|REJECTED|CANCELLED) break;; esac
  sleep 0.5
done
if [ "$status" != "SUCCESS" ]; then
  echo "smoke: the task ended as '$status'"; tail -50 "$tmp/dev.log"; exit 1
fi
curl -fs -o "$tmp/result.png" -H "Authorization: Bearer $key" "$base${poll}results/0/"
$py -c "from PIL import Image; im = Image.open('$tmp/result.png'); assert im.format == 'PNG', im.format"
# A streamed chat turn through the ASGI server: 50 tokens, then the settlement, last.
auth="Authorization: Bearer $key"
json="Content-Type: application/json"
session=$(curl -fs -H "$auth" -H "$json" -d '{"model": "sandbox-chat"}' \
  "$base/api/v1/chat/sessions/" | $py -c 'import json,sys; print(json.load(sys.stdin)["id"])')
events=$(curl -fsN -H "$auth" -H "$json" -H "Accept: text/event-stream" \
  -d '{"content": "smoke test", "max_tokens": 50}' "$base/api/v1/chat/sessions/$session/messages/")
last=$(printf '%s\n' "$events" | grep '^event:' | tail -1)
deltas=$(printf '%s\n' "$events" | grep -c '^event: delta' || true)
if [ "$last" != "event: settlement" ] || [ "$deltas" != "50" ]; then
  echo "smoke: the chat stream ended with '$last' after $deltas deltas"; tail -50 "$tmp/dev.log"
  exit 1
fi
# A single task inside the request (the gate in the database, as on the embedded default).
single=$(curl -fs -H "$auth" -H "$json" \
  -d '{"text": "good morning", "source_language": "en", "target_language": "hi"}' \
  "$base/api/v1/single/translation/")
printf '%s' "$single" | $py -c 'import json,sys; b = json.load(sys.stdin); assert b["status"] == "SUCCESS" and b["result"]["text"], b' \
  || { echo "smoke: the translation failed: $single"; tail -50 "$tmp/dev.log"; exit 1; }
$py manage.py ledger_check
if grep -q "callbacks cannot reach" "$tmp/dev.log"; then
  echo "smoke: callbacks cannot reach the server"; grep "callbacks cannot reach" "$tmp/dev.log"; exit 1
fi
echo "smoke: ok (a sandbox-image task reached SUCCESS, a chat turn streamed and settled, and a translation answered inside the request, through the embedded stack)"
