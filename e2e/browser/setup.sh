#!/usr/bin/env bash
# What the headless-browser tests (e2e/tests/dashboard.rs) need on a fresh machine:
#   - Debian's `chromium` (apt-get; never a browser download of Playwright's own);
#   - playwright-core from npm (e2e/browser/node_modules, pinned by package-lock.json).
# Fast when both are there.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
say() { printf 'setup-browser: %s\n' "$*"; }
die() { printf 'setup-browser: ERROR: %s\n' "$*" >&2; exit 1; }

if [[ -z "${FLEDGE_CHROMIUM:-}" ]] && ! command -v chromium >/dev/null; then
    command -v apt-get >/dev/null || die "chromium not found and apt-get is not available; install Chromium or set FLEDGE_CHROMIUM"
    SUDO=""
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null || die "installing chromium needs root: run apt-get install chromium as root"
        SUDO="sudo"
    fi
    say "installing Debian's chromium package (headless browser for the dashboard tests)"
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
fi
command -v node >/dev/null || die "node not found; install Node.js 18+ (Debian: apt-get install nodejs npm)"
if [[ ! -f "$HERE/node_modules/playwright-core/package.json" ]]; then
    command -v npm >/dev/null || die "npm not found (Debian: apt-get install npm)"
    say "installing playwright-core (npm ci in e2e/browser)"
    (cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error)
fi
say "$(${FLEDGE_CHROMIUM:-chromium} --version 2>/dev/null | head -n1), node $(node --version), playwright-core $(node -p "require('$HERE/node_modules/playwright-core/package.json').version")"
