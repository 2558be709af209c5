"""After a crash: find runs whose process died (mark them FAILED) and finished variant runs a resumed sweep may
reuse instead of recomputing."""

from __future__ import annotations

import os
import socket

import mlflow
from mlflow.entities import RunStatus

from ptqflow.tracking.keys import Tag
from ptqflow.tracking.connection import client


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def mark_orphans_failed(experiment_id: str) -> list[str]:
    """RUNNING runs started on this host by a process that no longer exists end FAILED, with the reason as a tag.
    Runs of other hosts are left alone: their process may be alive there."""
    c = client()
    host = socket.gethostname()
    orphans = []
    runs = c.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.`{Tag.HOST}` = '{host}'",
                         max_results=1000)
    for run in runs:
        pid = run.data.tags.get(Tag.PID)
        if not pid or not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
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
