#!/usr/bin/env bash
# The main job on one machine: an aggregator in `lite` mode and an agent, with embedded defaults (no external
# service), ingesting what Session-Buddy pushed (the fixture) and answering lookups.
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

# Replay what Session-Buddy's sync_to_akosha really sent (49 HTTP requests) against the agent, as it would.
echo "== replaying Session-Buddy's HTTP push ($FIXTURE) against the agent"
python3 - "$FIXTURE" <<'PY'
import json, sys, urllib.error, urllib.request
sent = 0
for line in open(sys.argv[1]):
    req = json.loads(line)
    url = "http://127.0.0.1:8682" + req["path"]
    data = json.dumps(req["body"]).encode() if req.get("body") is not None else None
    r = urllib.request.Request(url, data=data, method=req["method"], headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(r) as resp:
        body = json.loads(resp.read() or b"null")
    if data:
        sent += 1
        assert "result" in body, body
print(f"   {sent} tool calls answered")
PY
for _ in $(seq 100); do
  total=$(curl -fs http://127.0.0.1:8683/v1/stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["total_records"])')
  [ "$total" -ge 67 ] && break; sleep 0.1
done
echo "== aggregator stats"
curl -fsS http://127.0.0.1:8683/v1/stats | python3 -m json.tool
echo "== lookup of memory d55603a5851028e1 (embedding elided)"
curl -fsS "http://127.0.0.1:8683/v1/records/$AKOSHA_SYSTEM_ID/conversation/d55603a5851028e1" \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); r["embedding"]="<%d floats>" % len(r.get("embedding", [])); print(json.dumps(r, indent=2))'
for _ in $(seq 200); do
  pending=$(curl -fs http://127.0.0.1:8683/v1/stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["hot"]["index_pending"])')
  [ "$pending" -eq 0 ] && break; sleep 0.1
done
echo "== searches: words of that memory (BM25), its own embedding (HNSW), and a question embedded in-process"
curl -fsS "http://127.0.0.1:8683/v1/records/$AKOSHA_SYSTEM_ID/conversation/d55603a5851028e1" | python3 -c '
import json, sys, urllib.request
record = json.load(sys.stdin)
def search(mode, body):
    req = urllib.request.Request("http://127.0.0.1:8683/v1/search/" + mode, data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        return json.loads(resp.read())
words = " ".join(record["text"].split()[:8])
print("text search for %r:" % words)
for hit in search("text", {"query": words, "limit": 3})["results"]:
    print("  %-18s %6.2f  %s" % (hit["record"]["id"], hit["score"], hit["snippet"]["fragment"][:90].replace("\n", " ")))
print("vector search with its embedding:")
for hit in search("vector", {"embedding": record["embedding"], "limit": 3})["results"]:
    print("  %-18s %6.3f  %s" % (hit["record"]["id"], hit["similarity"], (hit["record"].get("text") or "")[:90].replace("\n", " ")))
question = "why were batches lost at shutdown?"
print("hybrid search for the question %r (all-MiniLM-L6-v2 in the aggregator):" % question)
try:
    for hit in search("hybrid", {"query": question, "limit": 3})["results"]:
        print("  %-18s %6.3f  %s" % (hit["record"]["id"], hit.get("similarity") or 0, (hit["record"].get("text") or "")[:90].replace("\n", " ")))
except urllib.error.HTTPError as e:
    print("  (no embedding model: run scripts/setup.sh) %s" % e.read().decode())
'
