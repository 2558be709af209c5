"""Who may end or reopen a tune study's parent run, when several workers share the study.

Two records in the study's own RDB storage (study user attributes, one row each):

- each worker's beat, `worker.<host>.<pid>` = {"state": "active" | "done", "beat": unix time}, written only by
  that worker (no two workers write one row) every heartbeat while it works, "done" when it stops. A worker whose
  beat is older than the grace period (two heartbeats and two seconds) is dead.
- the parent run's endings and reopenings as claims: `ended.<g>` and `reopened.<g>`, g the number of times the
  study was taken up again. A claim is one INSERT into the attributes table, whose unique (study_id, key)
  constraint lets exactly one of two racing workers in: the worker whose insert went in ends (or reopens) the run,
  the other leaves it. Optuna's own `set_user_attr` reads then writes, so it cannot serve as a lock.
"""

from __future__ import annotations

import json
import threading
import time

WORKER_ATTR_PREFIX = "worker."
ENDED_ATTR_PREFIX = "ended."
REOPENED_ATTR_PREFIX = "reopened."
ACTIVE, DONE = "active", "done"


def worker_key(worker: str) -> str:
    """The study attribute of a worker `host:pid` (Optuna keys take any text; ':' kept out for readability)."""
    return WORKER_ATTR_PREFIX + worker.replace(":", ".")


def grace_s(heartbeat_s: float) -> float:
    """How long a worker's beat stays fresh: two beats missed, and two seconds for clocks and the database."""
    return 2 * heartbeat_s + 2


def others_active(user_attrs: dict, worker: str, heartbeat_s: float, now: float | None = None) -> list[str]:
    """The other workers whose beat says they are working (state active, beat within the grace period)."""
    now = time.time() if now is None else now
    mine = worker_key(worker)
    return [key.removeprefix(WORKER_ATTR_PREFIX) for key, value in user_attrs.items()
            if key.startswith(WORKER_ATTR_PREFIX) and key != mine and isinstance(value, dict)
            and value.get("state") == ACTIVE and now - float(value.get("beat", 0)) <= grace_s(heartbeat_s)]


def generation(user_attrs: dict) -> int:
    """How many times the study was taken up again after its parent run ended."""
    return sum(key.startswith(REOPENED_ATTR_PREFIX) for key in user_attrs)


def claim(study, key: str, value) -> bool:
    """Insert the study attribute `key` = `value` unless it exists: True for the one caller whose row went in.

    One INSERT on Optuna's `study_user_attributes` table, atomic through its unique (study_id, key) constraint, on
    sqlite and PostgreSQL alike."""
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    storage = getattr(study._storage, "_backend", study._storage)  # optuna wraps the RDBStorage in a cache
    try:
        with storage.engine.begin() as connection:
            connection.execute(text("INSERT INTO study_user_attributes (study_id, key, value_json) "
                                    "VALUES (:study_id, :key, :value)"),
                               {"study_id": study._study_id, "key": key, "value": json.dumps(value)})
    except IntegrityError:
        return False
    return True


class WorkerBeat:
    """This worker's beat in the study, written from a background thread every `heartbeat_s` until `stop()`,
    which records the worker done. Started when the worker joins, so a worker still preparing its FP32 reference or
    between two trials counts as working."""

    def __init__(self, study, worker: str, heartbeat_s: float):
        self.study = study
        self.key = worker_key(worker)
        self.heartbeat_s = heartbeat_s
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._write(ACTIVE)
        self._thread = threading.Thread(target=self._beat, name="ptqflow-tune-worker-beat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stopped.wait(self.heartbeat_s):
            try:
                self._write(ACTIVE)
            except Exception:  # noqa: BLE001 - a lost beat is retried at the next; the worker's own calls report errors
                pass

    def _write(self, state: str) -> None:
        self.study.set_user_attr(self.key, {"state": state, "beat": time.time()})

    def stop(self) -> None:
        """Stop beating and record this worker done (no later beat can overwrite it)."""
        if self._thread is None:
            return  # never started: nothing recorded
        self._stopped.set()
        self._thread.join()
        self._write(DONE)
