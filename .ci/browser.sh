#!/usr/bin/env bash
# What the `ui` tests (tests/test_ui.py) need: Debian's chromium at /usr/bin/chromium and the `playwright` package,
# used only as a driver for that binary. Playwright's own browser download (`playwright install`) is never run.
# Idempotent and quiet: installs only what is missing. Run it with the project's venv active (or it uses .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

PLAYWRIGHT_VERSION=1.65.2

if [ ! -x /usr/bin/chromium ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "error: /usr/bin/chromium is missing and installing it needs root" >&2; exit 1; }
    sudo="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Wait for another apt/dpkg (a second checkout installing the same thing) instead of failing on its lock.
  $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
  $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi

if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  . .venv/bin/activate
fi
python=$(command -v python || command -v python3)
if ! "$python" -c 'import playwright.sync_api' >/dev/null 2>&1; then
  "$python" -m pip install --quiet --disable-pip-version-check "playwright==$PLAYWRIGHT_VERSION"
fi
