#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run): formatting, lints, unit, property and end-to-end tests.
# Everything builds with the release profile so DuckDB's C++ is compiled once for binaries, tests and benches.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/akosha-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

cargo fmt --all --check
cargo fmt --all --check --manifest-path plugins/Cargo.toml
# Deployment files that no Rust test reads must at least parse.
python3 -c 'import plistlib, sys; [plistlib.load(open(p, "rb")) for p in sys.argv[1:]]' config/launchd/*.plist
# The end-to-end tests start the real binaries from the target directory.
cargo build --release --workspace --bins
cargo clippy --release --workspace --all-targets -- -D warnings
# Policy plugins: their rules natively, then the WASM components the agent's tests load.
cargo test --release --manifest-path plugins/Cargo.toml -p akosha-plugin-sdk -p akosha-residency -p akosha-compression \
  --target-dir "$CARGO_TARGET_DIR/plugins-native" --quiet
bash scripts/build-plugins.sh >/dev/null
cargo nextest run --release --workspace --no-fail-fast --failure-output final
