"""After a crash: find runs whose process died (mark them FAILED) and finished variant runs a resumed sweep may
reuse instead of recomputing."""

from __future__ import annotations

import os
import socket

import mlflow
from mlflow.entities import RunStatus

from ptqflow.tracking.keys import Tag
from ptqflow.tracking.connection import client
from ptqflow.tracking.runs import process_start


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _orphaned(run) -> bool:
    """Whether the process that made `run` (tagged on this host) is known dead. With its process start
    (Tag.PROCESS_START): only when its boot id and pid namespace are this process's can the pid be looked up here,
    and it is dead when no process has that pid or the one that has it started at another time (a reused pid).
    A run made in another container (its pid namespace) or before a reboot, or without the tag on a machine that
    records it, is left alone: its process cannot be looked up from here. Without /proc: the pid alone."""
    pid = run.data.tags.get(Tag.PID)
    if not pid or not pid.isdigit() or int(pid) == os.getpid():
        return False
    recorded, here = run.data.tags.get(Tag.PROCESS_START), process_start(os.getpid())
    if here is None:
        return not _process_alive(int(pid))
    if recorded is None or recorded.rsplit("/", 1)[0] != here.rsplit("/", 1)[0]:
        return False
    return process_start(int(pid)) != recorded


def mark_orphans_failed(experiment_id: str) -> list[str]:
    """RUNNING runs started on this host by a process that no longer exists (_orphaned) end FAILED, with the reason
    as a tag. Runs of other hosts and other containers are left alone: their process may be alive there."""
    c = client()
    host = socket.gethostname()
    orphans = []
    runs = c.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.`{Tag.HOST}` = '{host}'",
                         max_results=1000)
    for run in runs:
        if not _orphaned(run):
            continue
        pid = run.data.tags[Tag.PID]
        c.set_tag(run.info.run_id, Tag.REASON, f"process {pid} on {host} died before ending this run")
        c.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        orphans.append(run.info.run_id)
    return orphans


def find_reusable(experiment_id: str, input_key: str):
    """The newest FINISHED, ok variant run with exactly these inputs, or None."""
    runs = client().search_runs(
        [experiment_id],
        f"attributes.status = 'FINISHED' and tags.`{Tag.INPUT_KEY}` = '{input_key}' "
        f"and tags.`{Tag.STATUS}` = '{Tag.STATUS_OK}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def load_json_artifact(run_id: str, path: str):
    import json

    return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{path}"))
