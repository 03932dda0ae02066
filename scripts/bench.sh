#!/usr/bin/env bash
# Runs every benchmark with the release profile (shared with tests and binaries) and prints the results that
# BENCHMARKS.md records. Arguments are passed to each bench (e.g. a duration).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/akosha-target}"
cargo build --release --workspace --bins
for bench in "akosha-agent buffer_ingest" "akosha-aggregator transport" "akosha-e2e pipeline"; do
  set -- $bench
  echo "== $1 / $2"
  cargo bench --profile release -p "$1" --bench "$2" -q -- "${@:3}"
done
