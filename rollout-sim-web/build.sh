#!/usr/bin/env bash
# The browser decision simulator: fledge-core + fledge-rollout-sim compiled to WebAssembly, and the
# JavaScript glue from wasm-bindgen, in rollout-sim-web/pkg/ (embedded by the fledge binary built
# afterwards; see controller/build.rs).
#
# rollout-sim-web/pkg is committed with the list of inputs it was built from (rollout-sim-web/pkg/inputs.txt,
# see rollout-sim-web/inputs.py). While they are unchanged this script does nothing, so a fresh
# machine needs neither the wasm32-unknown-unknown target nor wasm-bindgen-cli (whose
# `cargo install` takes minutes). When they changed it rebuilds the package, installing what it
# needs:
#   - the Rust target wasm32-unknown-unknown (rustup);
#   - wasm-bindgen-cli, at exactly the version of the wasm-bindgen crate (cargo install);
# and asks for the new package to be committed.
#
#   bash rollout-sim-web/build.sh            rebuild only when the inputs changed
#   bash rollout-sim-web/build.sh --force    rebuild anyway
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARGO="${CARGO:-cargo}"
TARGET="wasm32-unknown-unknown"
OUT="$REPO_ROOT/rollout-sim-web/pkg"
say() { printf 'simulator: %s\n' "$*"; }
die() { printf 'simulator: ERROR: %s\n' "$*" >&2; exit 1; }

if [[ "${1:-}" != "--force" ]]; then
    if ! command -v python3 >/dev/null; then
        say "python3 not found: cannot compare rollout-sim-web/pkg with its inputs, so it is rebuilt"
    elif [[ ! -f "$OUT/fledge_rollout_sim_web_bg.wasm" || ! -f "$OUT/fledge_rollout_sim_web.js" ]]; then
        say "rollout-sim-web/pkg has no package yet: building it"
    elif changed="$(python3 "$REPO_ROOT/rollout-sim-web/inputs.py" --check 2>&1)"; then
        say "up to date (rollout-sim-web/pkg matches its inputs in rollout-sim-web/pkg/inputs.txt)"
        exit 0
    else
        say "rollout-sim-web/pkg is stale, rebuilding it. $changed"
    fi
fi

# The wasm-bindgen crate version pinned in rollout-sim-web/Cargo.toml (`=X.Y.Z`); the CLI must match.
VERSION="$(sed -n 's/^wasm-bindgen = "=\([0-9.]*\)".*/\1/p' "$REPO_ROOT/rollout-sim-web/Cargo.toml")"
[[ -n "$VERSION" ]] || die "cannot read the pinned wasm-bindgen version from rollout-sim-web/Cargo.toml"

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
"$CARGO" build -p fledge-rollout-sim-web --target "$TARGET" --release
WASM="${CARGO_TARGET_DIR:-target}/$TARGET/release/fledge_rollout_sim_web.wasm"
[[ -f "$WASM" ]] || die "$WASM was not built"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$BINDGEN" --target web --no-typescript --out-dir "$TMP" "$WASM"
# Rewrite a file only when it changed, so the fledge binary is not rebuilt for nothing.
for file in fledge_rollout_sim_web.js fledge_rollout_sim_web_bg.wasm; do
    cmp -s "$TMP/$file" "$OUT/$file" || cp "$TMP/$file" "$OUT/$file"
done
if command -v python3 >/dev/null; then
    python3 rollout-sim-web/inputs.py > "$TMP/inputs.txt"
    if ! cmp -s "$TMP/inputs.txt" "$OUT/inputs.txt"; then
        cp "$TMP/inputs.txt" "$OUT/inputs.txt"
        say "rebuilt rollout-sim-web/pkg: commit it (the package and inputs.txt) so that fresh machines skip this build"
    fi
fi
ls -l "$OUT/fledge_rollout_sim_web_bg.wasm" | awk '{printf "simulator: %s (%.0f KiB)\n", $9, $5/1024}'
