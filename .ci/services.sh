#!/usr/bin/env bash
# What the tracking-server tests (tests/test_remote_tracking.py, marker `server`) need beyond the venv:
# Debian's PostgreSQL server binaries (initdb, pg_ctl, postgres), and in the active venv the psycopg (3) driver
# and Flask-WTF (for MLflow's basic-auth app).
# Idempotent and quiet: installs only what is missing; any failure stops with a message and a non-zero exit.
# Run it (`bash .ci/services.sh`) or source it, after `. .venv/bin/activate`. The tests start their own
# throw-away clusters and servers on 127.0.0.1; nothing here starts a service.

_ptqflow_services() (
  set -euo pipefail
  fail() { echo "services.sh: $*" >&2; exit 1; }

  # --- PostgreSQL server binaries ---------------------------------------------------------------------------
  if ! command -v initdb >/dev/null 2>&1 && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    [ "$(id -u)" -eq 0 ] || fail "PostgreSQL is not installed and installing it needs root (apt-get install postgresql)"
    echo "services.sh: installing PostgreSQL (apt-get install postgresql)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || fail "apt-get update failed"
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null || fail "apt-get install postgresql failed"
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
      || fail "postgresql installed, but no /usr/lib/postgresql/*/bin/initdb"
  fi
  # The package creates the 'postgres' system user; postgres refuses to run as root, so the tests use it.
  if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    fail "no 'postgres' system user (the postgresql package creates it); reinstall postgresql-common"
  fi

  # --- Python packages in the active venv ---------------------------------------------------------------------
  python=${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/}python
  if [ -z "${VIRTUAL_ENV:-}" ]; then
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    [ -x "$here/.venv/bin/python" ] || fail "no active venv and no $here/.venv; activate the project's venv first"
    python="$here/.venv/bin/python"
  fi
  # psycopg: SQLAlchemy 2.1's driver for postgresql:// URIs. Flask-WTF: `mlflow server --app-name basic-auth`
  # (MLflow's `auth` extra) refuses to start without it.
  missing=()
  "$python" -c 'import psycopg' >/dev/null 2>&1 || missing+=('psycopg[binary]==3.3.9')
  "$python" -c 'import flask_wtf' >/dev/null 2>&1 || missing+=('flask-wtf==1.3.0')
  if [ ${#missing[@]} -gt 0 ]; then
    echo "services.sh: installing ${missing[*]} into $("$python" -c 'import sys; print(sys.prefix)')"
    log=$(mktemp)
    "$python" -m pip install --quiet --disable-pip-version-check "${missing[@]}" >"$log" 2>&1 \
      || { cat "$log" >&2; rm -f "$log"; fail "pip install ${missing[*]} failed"; }
    rm -f "$log"
    "$python" -c 'import psycopg, flask_wtf' || fail "${missing[*]} installed but does not import"
  fi
)

_ptqflow_services
