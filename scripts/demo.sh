#!/usr/bin/env bash
# The main job on one machine: an aggregator in `lite` mode and an agent, with embedded defaults (no external
# service), ingesting the memories Session-Buddy pushed in the fixture and answering lookups.
# Data lives under ~/.akosha (never in the repository). Stops both processes on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/akosha-target}"
BIN="$CARGO_TARGET_DIR/release"
FIXTURE="${FIXTURE:-../shared/fixtures/session-buddy/http_push_20.jsonl}"
export AKOSHA_SYSTEM_ID="${AKOSHA_SYSTEM_ID:-edge-host-1}"
CERTS="$HOME/.akosha/dev/certs"

cargo build --release --bins -q
[ -f "$CERTS/ca.pem" ] || "$BIN/akosha-aggregator" --config config/lite.yaml certs init
[ -f "$CERTS/agents/$AKOSHA_SYSTEM_ID.pem" ] || "$BIN/akosha-aggregator" --config config/lite.yaml certs issue "$AKOSHA_SYSTEM_ID"

"$BIN/akosha-aggregator" --config config/lite.yaml run 2>"$HOME/.akosha/aggregator.log" &
AGG=$!
"$BIN/akosha-agent" --config config/agent.yaml run 2>"$HOME/.akosha/agent.log" &
AGENT=$!
trap 'kill $AGENT $AGG 2>/dev/null; wait 2>/dev/null' EXIT
for url in http://127.0.0.1:8683/ready http://127.0.0.1:8682/health; do
  for _ in $(seq 100); do curl -fs "$url" >/dev/null && break; sleep 0.1; done
done

# Session-Buddy's batch_store_memories calls → NDJSON records for the agent's ingest API.
python3 - "$FIXTURE" > "$HOME/.akosha/demo.ndjson" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    req = json.loads(line)
    body = req.get("body") or {}
    params = body.get("params") or {}
    if params.get("name") != "batch_store_memories":
        continue
    for m in params["arguments"]["memories"]:
        meta = m.get("metadata") or {}
        rec = {"id": m["memory_id"], "kind": "conversation", "text": m["text"], "metadata": meta,
               "project": meta.get("project"), "category": meta.get("category")}
        if m.get("embedding"):
            rec["embedding"] = m["embedding"]
        print(json.dumps({k: v for k, v in rec.items() if v is not None}))
PY
echo "== posting $(wc -l < "$HOME/.akosha/demo.ndjson") Session-Buddy memories to the agent"
curl -fsS -X POST --data-binary @"$HOME/.akosha/demo.ndjson" http://127.0.0.1:8682/v1/records; echo
for _ in $(seq 100); do
  total=$(curl -fs http://127.0.0.1:8683/v1/stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["total_records"])')
  [ "$total" -gt 0 ] && break; sleep 0.1
done
echo "== aggregator stats"
curl -fsS http://127.0.0.1:8683/v1/stats; echo
first=$(head -1 "$HOME/.akosha/demo.ndjson" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "== lookup of memory $first"
curl -fsS "http://127.0.0.1:8683/v1/records/$AKOSHA_SYSTEM_ID/conversation/$first" | python3 -c 'import json,sys; r=json.load(sys.stdin); r["embedding"]=f"<{len(r.get(\"embedding\",[]))} floats>"; print(json.dumps(r, indent=2))'
