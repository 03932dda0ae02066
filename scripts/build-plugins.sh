#!/usr/bin/env bash
# Builds every policy plugin crate in plugins/ into a WASM component:
#   $AKOSHA_PLUGIN_DIR (default $CARGO_TARGET_DIR/plugins)/<crate>.wasm
#
# Prefers an installed rustup wasm32-unknown-unknown target. Without one (this offline workplace), it uses
# Debian's rustc-web + rust-web-src + lld-16 with -Zbuild-std, installing what is missing. Core modules become
# components with `wasm-tools component new` (installed with cargo when missing). Idempotent and incremental.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

log() { printf '\033[1;34m[plugins]\033[0m %s\n' "$*" >&2; }
SUDO=$([ "$(id -u)" -ne 0 ] && echo sudo || true)

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/akosha-target}"
out_dir="${AKOSHA_PLUGIN_DIR:-$CARGO_TARGET_DIR/plugins}"
wasm_target_dir="$CARGO_TARGET_DIR/wasm"
mkdir -p "$out_dir"

# SIMD128 lets the guests' memchr/regex prefilters scan text 16 bytes at a time (wasmtime supports it on every
# host it runs on); it made the shipped residency policy markedly faster (BENCHMARKS.md).
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS="${CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS:--C target-feature=+simd128}"

build_args=(build --release --target wasm32-unknown-unknown --target-dir "$wasm_target_dir"
  --manifest-path "$root/plugins/Cargo.toml" --workspace)

if command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  log "using the installed rustup wasm32-unknown-unknown target"
  cargo "${build_args[@]}"
else
  log "no rustup wasm target: using the offline toolchain (rustc-web, rust-web-src, lld-16)"
  missing=()
  for pkg in rustc-web rust-web-src lld-16; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
  RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
  CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=/usr/lib/llvm-16/bin/wasm-ld \
    cargo "${build_args[@]}" -Zbuild-std=std,panic_abort
fi

# Core module -> component: wasm-tools when installed, else the agent's built-in encoder (same library).
componentize() {
  if command -v wasm-tools >/dev/null 2>&1; then
    wasm-tools component new "$1" -o "$2"
  else
    agent="$CARGO_TARGET_DIR/release/akosha-agent"
    if [ ! -x "$agent" ]; then
      log "building akosha-agent for its component encoder"
      # --workspace, never -p: a different feature set would rebuild DuckDB.
      cargo build --release --workspace --bins --manifest-path "$root/Cargo.toml"
    fi
    "$agent" plugin componentize "$1" -o "$2"
  fi
}

# Every cdylib of the plugin workspace becomes a component.
for module in "$wasm_target_dir"/wasm32-unknown-unknown/release/*.wasm; do
  name=$(basename "$module" .wasm | tr '_' '-')
  component="$out_dir/$name.wasm"
  if [ ! -f "$component" ] || [ "$module" -nt "$component" ]; then
    componentize "$module" "$component.tmp"
    mv "$component.tmp" "$component"
    log "built $component"
  fi
done
echo "$out_dir"
