#!/usr/bin/env bash
# `make run`: the whole stack on the demo model, one chat question through the OpenAI endpoint,
# then keep serving until Ctrl-C (which stops every process `tessera serve` started).
#   scripts/run_demo.sh MODEL [QUESTION]   (a directory or .gguf; HTTP_PORT, GRPC_PORT: 8000, 50051)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?model directory or .gguf file}
PROMPT=${2:-What is the capital of France?}
HTTP_PORT=${HTTP_PORT:-8000}
GRPC_PORT=${GRPC_PORT:-50051}
PY=${PY:-.venv/bin/python}
NAME=$(basename "$MODEL")

$PY -m tessera.cli serve --model "$MODEL" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" &
SERVE=$!
trap 'kill -TERM $SERVE 2>/dev/null; wait $SERVE 2>/dev/null' EXIT
trap 'exit 0' INT TERM

# wait for readiness, then send one chat completion with nothing but the standard library
PROMPT="$PROMPT" NAME="$NAME" PORT="$HTTP_PORT" $PY - <<'PYEOF'
import json, os, time, urllib.error, urllib.request

base = f"http://127.0.0.1:{os.environ['PORT']}"
deadline = time.time() + 300
while True:
    try:
        urllib.request.urlopen(base + "/ready", timeout=2)
        break
    except (urllib.error.URLError, ConnectionError, OSError):
        if time.time() > deadline:
            raise SystemExit("the stack did not become ready")
        time.sleep(0.5)
body = {"model": os.environ["NAME"], "max_tokens": 64, "temperature": 0,
        "messages": [{"role": "user", "content": os.environ["PROMPT"]}]}
print(f"\n$ curl {base}/v1/chat/completions -d '{json.dumps(body)}'")
req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                             headers={"content-type": "application/json"})
print(json.dumps(json.load(urllib.request.urlopen(req, timeout=120)), indent=2))
print(f"\nserving {os.environ['NAME']} at {base}/v1 (OpenAI) - Ctrl-C stops everything")
PYEOF
wait $SERVE
