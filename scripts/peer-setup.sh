#!/usr/bin/env bash
# Installs the Python peer (PyPI `akosha` 0.24.5) into ~/.cache/akosha-peer for the side-by-side benchmark
# (`cargo bench --profile release --workspace --bench peer`). Not part of the test suite; idempotent.
#
# akosha 0.24.5 and its substrate (oneiric, mcp-common) declare Requires-Python >= 3.14. This machine has
# CPython 3.13 (pyenv) and no way to fetch 3.14, so the wheels are installed with --ignore-requires-python and
# the three 3.14-only constructs they use are rewritten in the installed copy, mechanically and with the same
# meaning: `except A, B:` (PEP 758) → `except (A, B):`; annotations evaluated lazily (PEP 649) →
# `from __future__ import annotations`; `uuid.uuid7` (3.14 stdlib) → the `uuid6` package's. Only the code path
# the benchmark drives (HotStore: insert, search_similar) has to work; the dependencies installed are the
# ones importing it needs.
set -euo pipefail
PEER_DIR="${AKOSHA_PEER_DIR:-$HOME/.cache/akosha-peer}"
VENV="$PEER_DIR/venv"
PEER_VERSION=0.24.5

python_for_peer() {
  for candidate in python3.14 "$HOME/.pyenv/versions/3.14"*/bin/python3 python3.13 "$HOME/.pyenv/versions/3.13"*/bin/python3; do
    # pyenv shims exist for versions that are not selected: run it to be sure.
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 13))' >/dev/null 2>&1; then
      echo "$candidate"
      return
    fi
  done
  echo "peer-setup: no Python 3.13 or 3.14 found" >&2
  exit 1
}

if [ -f "$PEER_DIR/.installed-$PEER_VERSION" ]; then
  echo "peer-setup: akosha $PEER_VERSION already installed in $VENV"
  exit 0
fi
PY="$(python_for_peer)"
rm -rf "$VENV" "$PEER_DIR/wheels"
mkdir -p "$PEER_DIR/wheels"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" download -q --no-deps --only-binary=:all: --python-version 3.14 -d "$PEER_DIR/wheels" \
  "akosha==$PEER_VERSION" "oneiric==0.33.3" "mcp-common==0.31.2"
"$VENV/bin/pip" install -q --no-deps --ignore-requires-python "$PEER_DIR"/wheels/*.whl
"$VENV/bin/pip" install -q duckdb numpy pydantic pydantic-settings email-validator structlog tenacity pyyaml \
  msgspec anyio opentelemetry-api httpx2 aiohttp pyjwt fastmcp typer psutil prometheus-client aiobreaker \
  pyarrow uuid6

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 14))'; then
  "$VENV/bin/python" - "$SITE" <<'PY'
import pathlib, re, sys
site = pathlib.Path(sys.argv[1])
except_list = re.compile(
    r"^(\s*except\s+)(?!\()([A-Za-z_][\w.]*(?:\s*,\s*[A-Za-z_][\w.]*)+)(\s*(?:as\s+\w+\s*)?:)", re.M)
uuid_import = re.compile(r"^from uuid import (.*)$", re.M)

def without_uuid7(m):
    names = [n.strip() for n in m.group(1).split(",") if n.strip() and n.strip() != "uuid7"]
    keep = f"from uuid import {', '.join(names)}\n" if names else ""
    return keep + "from uuid6 import uuid7"

for package in ("akosha", "oneiric", "mcp_common"):
    for path in (site / package).rglob("*.py"):
        text = path.read_text()
        new = except_list.sub(lambda m: f"{m.group(1)}({m.group(2)}){m.group(3)}", text)
        new = uuid_import.sub(lambda m: without_uuid7(m) if "uuid7" in m.group(1) else m.group(0), new)
        if "from __future__ import annotations" not in new:
            new = "from __future__ import annotations\n" + new
        if new != text:
            path.write_text(new)
PY
fi
"$VENV/bin/python" -c 'from akosha.storage.hot_store import HotStore; print("peer-setup: akosha HotStore imports")'
touch "$PEER_DIR/.installed-$PEER_VERSION"
