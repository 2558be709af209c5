"""The tracking store ptqflow talks to: its URI (with and without credentials), the MLflow client, a refusal of the
credentials as one TrackingError line, and the lock around a sqlite store's first use.

Only the `tracking` package imports mlflow.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import logging  # noqa: E402

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from ptqflow.common.errors import TrackingError  # noqa: E402

# MLflow's INFO lines (database migrations, "registered model") would bury ptqflow's own one-line messages.
logging.getLogger("mlflow").setLevel(logging.WARNING)


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def client() -> MlflowClient:
    return MlflowClient()


def public_tracking_uri() -> str:
    """The tracking URI without any user:password@ part, for messages."""
    return without_credentials(tracking_uri())


def without_credentials(uri: str) -> str:
    """`uri` without any user:password@ part (a tracking server's, a tune study's database), for params and
    messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return urlunsplit(parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else "")))


def refused_credentials(exc: Exception) -> TrackingError | None:
    """The one-line error for a server's HTTP 401/403 (MLflow raises a plain MlflowException with error_code
    UNAUTHENTICATED or PERMISSION_DENIED), naming the user but never the password; None for any other error."""
    code = getattr(exc, "error_code", None)
    status = exc.get_http_status_code() if isinstance(exc, mlflow.exceptions.MlflowException) else None
    if code not in ("UNAUTHENTICATED", "PERMISSION_DENIED") and status not in (401, 403):
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "(none)"
    if code == "PERMISSION_DENIED" or status == 403:
        return TrackingError(f"tracking server refused the credentials for user {user} at {public_tracking_uri()} "
                             "(HTTP 403: no permission for this request); ask the server's admin for access")
    return TrackingError(f"tracking server refused the credentials for user {user} at {public_tracking_uri()} "
                         "(HTTP 401); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account on it")


def sqlite_file(uri: str) -> Path | None:
    """The sqlite file of a `sqlite:///` tracking URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None


@contextmanager
def sqlite_setup_lock():
    """MLflow creates a new sqlite store's tables (and upgrades an old one) on first use in each process; two
    sweeps doing that at once crash ("duplicate column", "database is locked"). On a sqlite store, hold an
    inter-process lock around that first use; a process that has to wait says so on stderr, in one line."""
    db = sqlite_file(tracking_uri())
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    if db is None or fcntl is None:
        yield
        return
    import hashlib
    import sys

    lock_path = Path(tempfile.gettempdir()) / f"ptqflow-sqlite-{hashlib.sha256(str(db).encode()).hexdigest()[:16]}.lock"
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to finish setting up the sqlite store {db}", file=sys.stderr,
                  flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
