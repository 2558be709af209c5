"""Where a tune study lives: Optuna's RDB storage, a sqlite file beside the MLflow store on one machine, PostgreSQL
for several."""

from __future__ import annotations

import time
from pathlib import Path

from ptqflow.tracking import connection

STORAGE_OPEN_ATTEMPTS = 5  # opening a new database's storage while other workers create its tables


def default_storage() -> str:
    """Beside the MLflow store when it is a sqlite file (`optuna.db` next to `mlflow.db`), else in the working
    directory: one machine's default. Several machines pass --storage postgresql://..."""
    uri = connection.tracking_uri()
    store = connection.sqlite_file(uri)
    directory = store.parent if store is not None else Path.cwd()
    return f"sqlite:///{(directory / 'optuna.db').resolve()}"


def storage_url(url: str) -> str:
    """The SQLAlchemy URL Optuna opens: `postgresql://` through psycopg 3, the driver ptqflow installs."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


def open_storage(url: str, **kwargs):
    """optuna's RDBStorage on `url`, tried again while another worker is creating the tables of the same new database:
    Optuna creates them when a storage is first opened, and PostgreSQL's CREATE TABLE is not atomic, so of workers
    started together on an empty database all but one fail with "already exists" or a unique violation on a system
    catalog. The next try finds the tables (and the schema version) in place."""
    import random

    from optuna.storages import RDBStorage
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(1, STORAGE_OPEN_ATTEMPTS + 1):
        try:
            return RDBStorage(url, **kwargs)
        except (IntegrityError, ProgrammingError):
            if attempt == STORAGE_OPEN_ATTEMPTS:
                raise
            time.sleep(0.2 + random.random())  # not in step with the other worker
