#!/usr/bin/env bash
# Build the browser decision simulator: fledge-core + fledge-sim compiled to WebAssembly, and
# the JavaScript glue from wasm-bindgen, into simulator/pkg/ (embedded by the fledge binary
# built afterwards; see controller/build.rs). Installs what it needs on a fresh machine:
#   - the Rust target wasm32-unknown-unknown (rustup);
#   - wasm-bindgen-cli, at exactly the version of the wasm-bindgen crate (cargo install).
# Fast when everything is up to date.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARGO="${CARGO:-cargo}"
TARGET="wasm32-unknown-unknown"
say() { printf 'simulator: %s\n' "$*"; }
die() { printf 'simulator: ERROR: %s\n' "$*" >&2; exit 1; }

# The wasm-bindgen crate version pinned in simulator/Cargo.toml (`=X.Y.Z`); the CLI must match.
VERSION="$(sed -n 's/^wasm-bindgen = "=\([0-9.]*\)".*/\1/p' "$REPO_ROOT/simulator/Cargo.toml")"
[[ -n "$VERSION" ]] || die "cannot read the pinned wasm-bindgen version from simulator/Cargo.toml"

if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$TARGET"; then
    say "adding Rust target $TARGET"
    rustup target add "$TARGET"
fi

BINDGEN="$(command -v wasm-bindgen || true)"
if [[ -z "$BINDGEN" && -x "$HOME/.cargo/bin/wasm-bindgen" ]]; then
    BINDGEN="$HOME/.cargo/bin/wasm-bindgen"
fi
if [[ -z "$BINDGEN" ]] || [[ "$("$BINDGEN" --version 2>/dev/null | awk '{print $2}')" != "$VERSION" ]]; then
    say "installing wasm-bindgen-cli $VERSION (cargo install; a few minutes, once)"
    "$CARGO" install wasm-bindgen-cli --version "$VERSION"
    BINDGEN="$HOME/.cargo/bin/wasm-bindgen"
fi

cd "$REPO_ROOT"
"$CARGO" build -p fledge-simulator --target "$TARGET" --release
WASM="${CARGO_TARGET_DIR:-target}/$TARGET/release/fledge_simulator.wasm"
[[ -f "$WASM" ]] || die "$WASM was not built"
OUT="simulator/pkg"
# Only rewrite the package when the wasm changed, so the fledge binary is not rebuilt for nothing.
STAMP="$OUT/.source-stamp"
NEW_STAMP="$(cksum < "$WASM") $VERSION"
if [[ -f "$OUT/fledge_simulator_bg.wasm" && -f "$STAMP" && "$(cat "$STAMP")" == "$NEW_STAMP" ]]; then
    say "up to date ($OUT)"
    exit 0
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$BINDGEN" --target web --no-typescript --out-dir "$TMP" "$WASM"
cp "$TMP/fledge_simulator.js" "$TMP/fledge_simulator_bg.wasm" "$OUT/"
echo "$NEW_STAMP" > "$STAMP"
ls -l "$OUT/fledge_simulator_bg.wasm" | awk '{printf "simulator: %s (%.0f KiB)\n", $9, $5/1024}'
