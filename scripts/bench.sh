#!/usr/bin/env bash
# Runs every benchmark with the release profile (shared with tests and binaries) and prints the results that
# BENCHMARKS.md records. Arguments are passed to each bench (e.g. a duration).
#
# Always `--workspace --bench <name>`, never `-p <crate>`: building one package alone resolves different features
# for DuckDB's build dependencies and recompiles DuckDB (half an hour here).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/akosha-target}"
cargo build --release --workspace --bins
bash scripts/build-plugins.sh >/dev/null
for bench in buffer_ingest transport pipeline footprint residency ann_recall bm25 lookup embed peer; do
  echo "== $bench"
  cargo bench --profile release --workspace --bench "$bench" -q -- "$@"
done
