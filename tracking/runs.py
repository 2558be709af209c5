"""Runs: start and end them with the right status, runs no process holds active, and finding runs.

Runs end FINISHED on success, KILLED on Ctrl-C or SIGTERM and FAILED on any other exception, so a sweep never leaves
a run RUNNING. What a run records is ptqflow.tracking.records; the models it logs, ptqflow.tracking.logged_models.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager, suppress

import mlflow
from mlflow.entities import RunStatus

from ptqflow.common.errors import TrackingError, first_line
from ptqflow.common.interrupts import checkpoint
from ptqflow.tracking.connection import client, public_tracking_uri, refused_credentials, tracking_uri
from ptqflow.tracking.keys import Tag
from ptqflow.tracking.records import DetachedRun, forget_logged_model


def process_tags() -> dict[str, str]:
    """This process's pid, host and, where /proc tells it, its start (process_start): how a later sweep on the same
    machine tells whether the process that holds a run RUNNING is alive (ptqflow.tracking.recovery)."""
    tags = {Tag.PID: str(os.getpid()), Tag.HOST: socket.gethostname()}
    start = process_start(os.getpid())
    if start is not None:
        tags[Tag.PROCESS_START] = start
    return tags


def process_start(pid: int) -> str | None:
    """"<boot id>/<pid namespace>/<start time>" of process `pid` as this process sees it, or None when it does not
    exist (or there is no /proc). The boot id tells machines (and boots) apart, the pid namespace containers on one
    kernel (the same pid names another process in each), the start time (clock ticks after boot, field 22 of
    /proc/<pid>/stat) a pid reused by a later process: two live processes never share all three with the pid."""
    try:
        boot_id = open("/proc/sys/kernel/random/boot_id").read().strip()
        namespace = os.readlink("/proc/self/ns/pid").removeprefix("pid:").strip("[]")
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count fields after its closing parenthesis
    start_ticks = stat[stat.rindex(")") + 2:].split()[19]
    return f"{boot_id}/{namespace}/{start_ticks}"


@contextmanager
def run_scope(experiment_id: str | None = None, run_name: str | None = None, nested: bool = False,
              tags: dict[str, str] | None = None, parent_run_id: str | None = None):
    """Start (or, under `mlflow run`, resume) a run; end it FINISHED, KILLED or FAILED. Yields the run id.

    With `parent_run_id` the run is that run's child whether or not the parent is this process's active run (a tune
    worker's trials belong to a parent run another machine started). Every run carries this process's pid and host
    from its first moment, so a later sweep can tell a run whose process was killed (and mark it FAILED) however
    early the kill came."""
    checkpoint()  # a stop requested before this run began: do not begin it
    creation_tags = {**process_tags(), **(tags or {})}
    active = mlflow.active_run()
    try:
        if parent_run_id and (active is None or active.info.run_id != parent_run_id):
            # Created through the client with its parent tag, then made active: fluent start_run(parent_run_id=)
            # wants the parent to be the active run.
            created = _create_run(experiment_id, run_name, {**creation_tags, Tag.MLFLOW_PARENT: parent_run_id})
            run = mlflow.start_run(run_id=created.info.run_id, nested=active is not None)
        else:
            run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                                   nested=nested or parent_run_id is not None, tags=creation_tags)
        if run.data.tags.get(Tag.PID) != creation_tags[Tag.PID]:  # resumed (`mlflow run`): start_run ignored tags
            mlflow.set_tags(creation_tags)
    except mlflow.exceptions.MlflowException as exc:
        raise refused_credentials(exc) or TrackingError(
            f"tracking server at {public_tracking_uri()} refused to start a run: {first_line(exc)}") from exc
    def end(status: str) -> None:
        forget_logged_model(run.info.run_id)
        mlflow.end_run(status)

    with _ending(end):
        yield run.info.run_id


@contextmanager
def _ending(end):
    """Call end(status) when the block leaves: FINISHED, KILLED on Ctrl-C (and SIGTERM, which raises it), FAILED on
    any other exception."""
    status = RunStatus.FINISHED
    try:
        yield
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    except BaseException as exc:
        status = RunStatus.FAILED
        if tracking_failure(exc) is None:
            end(RunStatus.to_string(status))
        else:
            # The store failed: ending the run would fail the same way and hide this error behind its own. The run
            # stays RUNNING until the next sweep on this machine finds its process gone (recovery.mark_orphans_failed).
            with suppress(Exception):
                end(RunStatus.to_string(status))
        raise
    finally:
        if status != RunStatus.FAILED:
            end(RunStatus.to_string(status))


def _create_run(experiment_id: str, run_name: str, tags: dict[str, str]):
    """A new run created through the client (never made active here); a refusal is one TrackingError line."""
    try:
        return client().create_run(experiment_id, run_name=run_name, tags=tags)
    except mlflow.exceptions.MlflowException as exc:
        raise refused_credentials(exc) or TrackingError(
            f"tracking server at {public_tracking_uri()} refused to start a run: {first_line(exc)}") from exc


@contextmanager
def child_run(parent_run_id: str, run_name: str, tags: dict[str, str] | None = None):
    """A new run under `parent_run_id` (active or ended), in its experiment, written through the client; the active
    run stays as it is. Ends FINISHED, KILLED (Ctrl-C) or FAILED like run_scope, and carries this process's pid and
    host. Yields a DetachedRun."""
    checkpoint()
    parent = get_run(parent_run_id)
    run = _create_run(parent.info.experiment_id, run_name,
                      {**process_tags(), **(tags or {}), Tag.MLFLOW_PARENT: parent_run_id})
    with _ending(lambda status: client().set_terminated(run.info.run_id, status)):
        yield DetachedRun(run.info.run_id)


# ---- runs no process holds active: a tune study's parent run, shared by workers on several machines ------------------
@contextmanager
def detached_run(experiment_id: str, run_name: str, tags: dict[str, str] | None = None):
    """A new top-level run written through the client, left RUNNING when the block ends (other processes log under
    it and end it: `terminate`); FAILED when the block raises. Yields a DetachedRun. It carries no pid tag: no one
    process owns it, so ptqflow.tracking.recovery never takes it for an orphan of the process that started it."""
    checkpoint()
    run = _create_run(experiment_id, run_name, {Tag.HOST: socket.gethostname(), **(tags or {})})
    try:
        yield DetachedRun(run.info.run_id)
    except BaseException:
        client().set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        raise


def terminate(run_id: str, status: str) -> None:
    """End a run FINISHED, FAILED or KILLED."""
    client().set_terminated(run_id, status)


def reopen(run_id: str) -> None:
    """Set an ended run RUNNING again (a tune study taken up again logs more trials under its parent)."""
    client().update_run(run_id, status="RUNNING")


def tracking_failure(exc: BaseException) -> BaseException | None:
    """The failure of the tracking store in `exc` or the exceptions it was raised from or while handling: a
    TrackingError, an MlflowException or a failed HTTP request; None when there is none. A run that could not be
    recorded is no result of its variant: whoever catches a variant's failure lets this one stop the work."""
    import requests

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (TrackingError, mlflow.exceptions.MlflowException, requests.exceptions.RequestException)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


# ---- finding runs ----------------------------------------------------------------------------------------------------
def get_run(run_id: str):
    try:
        return client().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"no run {run_id} at {tracking_uri()}: {first_line(exc)}") from exc


def child_runs(parent_run_id: str):
    run = get_run(parent_run_id)
    return client().search_runs([run.info.experiment_id], f"tags.`{Tag.MLFLOW_PARENT}` = '{parent_run_id}'",
                                max_results=1000)


def runs_tagged(experiment_id: str, key: str, value: str) -> list:
    """The runs of an experiment whose tag `key` is `value`."""
    return client().search_runs([experiment_id], f"tags.`{key}` = '{value}'", max_results=1000)


def latest_sweep_run_id(experiment: str | None) -> str:
    """The latest sweep run of `experiment`, or with None of any experiment (each model has its own)."""
    if experiment is None:
        ids = [e.experiment_id for e in client().search_experiments()]
    else:
        experiment_obj = mlflow.get_experiment_by_name(experiment)
        if experiment_obj is None:
            raise TrackingError(f"no experiment '{experiment}' at {tracking_uri()}; run `ptqflow sweep` first")
        ids = [experiment_obj.experiment_id]
    runs = client().search_runs(ids, f"tags.`{Tag.ROLE}` = '{Tag.ROLE_SWEEP}'",
                                order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    if not runs:
        where = f"experiment '{experiment}'" if experiment is not None else f"the store at {tracking_uri()}"
        raise TrackingError(f"{where} has no sweep run yet; run `ptqflow sweep` first")
    return runs[0].info.run_id
