"""Crash and resume: orphaned runs of a killed process end FAILED; --resume reuses finished variants."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import CALIBRATION_SIZE, all_runs

from ptqflow.pipelines.sweep.options import SweepOptions

from ptqflow.pipelines.sweep.outcomes import VariantsFailed

from ptqflow.pipelines.sweep.sweep import run_sweep
from ptqflow.tracking.keys import Tag

VARIANTS = ("pytorch-fx-int8", "ort-uint8")


def _options(tiny_model, cifar_dir, **overrides) -> SweepOptions:
    settings = {"calibration_size": CALIBRATION_SIZE, "variants": VARIANTS, "bench": False, "register": False,
                "weight_rounding": "nearest"}
    return SweepOptions(model_path=tiny_model, data_dir=cifar_dir, **{**settings, **overrides})


def _runs_named(name: str) -> list:
    return [r for r in all_runs() if r.info.run_name == name]


def test_resume_reuses_finished_variants_and_recomputes_failed_ones(tracking_store, tiny_model, cifar_dir,
                                                                    monkeypatch):
    from ptqflow.models.backends import ort as quantize_ort

    real_quantize = quantize_ort.quantize
    monkeypatch.setattr(quantize_ort, "quantize", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(VariantsFailed):
        run_sweep(_options(tiny_model, cifar_dir))
    monkeypatch.setattr(quantize_ort, "quantize", real_quantize)

    resumed = run_sweep(_options(tiny_model, cifar_dir, resume=True))
    by_name = {o.name: o for o in resumed.outcomes}
    first_fx_run = _runs_named("pytorch-fx-int8")[0].info.run_id
    assert by_name["pytorch-fx-int8"].run_id == first_fx_run and by_name["pytorch-fx-int8"].reason.startswith("reused")
    assert by_name["ort-uint8"].status == "ok" and not by_name["ort-uint8"].reason
    assert len(_runs_named("pytorch-fx-int8")) == 1  # not recomputed
    assert len(_runs_named("ort-uint8")) == 2  # the failed run and the recomputed one
    parent = next(r for r in all_runs() if r.info.run_id == resumed.parent_run_id)
    assert parent.data.tags[Tag.REUSED_FROM + "pytorch-fx-int8"] == first_fx_run
    assert by_name["pytorch-fx-int8"].evaluation.accuracy == pytest.approx(
        _runs_named("pytorch-fx-int8")[0].data.metrics["accuracy"])
    # the tables say which row is an earlier sweep's run
    from ptqflow.pipelines.reports.comparison import REUSED_MARK, REUSED_NOTE
    from ptqflow.tracking.keys import Artifact
    from ptqflow.tracking.records import download_text

    table = download_text(resumed.parent_run_id, Artifact.COMPARISON_MD).splitlines()
    row = {line.split("|")[1].strip(): line for line in table if line.startswith("| ") and "|---" not in line}
    assert f"pytorch-fx-int8 {REUSED_MARK}" in row and "ort-uint8" in row  # the recomputed one unmarked
    assert f"- {REUSED_NOTE}" in table
    assert f"{REUSED_MARK} reused</span>" in download_text(resumed.parent_run_id, Artifact.COMPARISON_HTML)


def test_plots_label_a_reused_row():
    from ptqflow.pipelines.reports.comparison import REUSED_MARK, VariantRow
    from ptqflow.pipelines.reports.plots import accuracy_vs_size_figure, agreement_figure

    def row(name: str, reason: str = "") -> VariantRow:
        return VariantRow(name, "onnxruntime", "onnxruntime-cpu", "int8", "uint8", "QDQ", True, "MinMax", "ok",
                          accuracy=0.9, top1_agreement=0.98, model_size_bytes=1024, reason=reason)

    rows = [row("ort-int8", "reused run 0123abcd"), row("ort-uint8")]
    bars = [t.get_text() for t in agreement_figure(rows, 0.97).axes[0].get_yticklabels()]
    assert bars == [f"ort-int8 {REUSED_MARK} reused", "ort-uint8"]
    labels = {t.get_text() for t in accuracy_vs_size_figure(rows).axes[0].texts}
    assert f"ort-int8 {REUSED_MARK} reused" in labels and "ort-uint8" in labels


def test_resume_recomputes_when_any_input_changes(tracking_store, tiny_model, cifar_dir):
    run_sweep(_options(tiny_model, cifar_dir))
    changed = run_sweep(_options(tiny_model, cifar_dir, resume=True, calibration_seed=1))
    assert not any(o.reason.startswith("reused") for o in changed.outcomes)
    assert len(_runs_named("pytorch-fx-int8")) == 2


@pytest.mark.slow
def test_runs_of_a_killed_process_are_marked_failed_by_the_next_sweep(tracking_store, tiny_model, cifar_dir):
    import mlflow

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    assert all_runs() == []  # creates the store's tables now, not concurrently with the subprocess
    args = ["sweep", "--model", tiny_model, "--data-dir", cifar_dir, "--calibration-size", CALIBRATION_SIZE,
            "--no-register", "--weight-rounding", "nearest"]
    proc = subprocess.Popen([sys.executable, "-m", "ptqflow", *map(str, args)], cwd=tracking_store, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not [r for r in all_runs() if r.info.status == "RUNNING"
                                          and r.data.tags.get(Tag.ROLE) == Tag.ROLE_VARIANT
                                          and r.info.run_name != "fp32"]:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    stranded = [r.info.run_id for r in all_runs() if r.info.status == "RUNNING"]
    assert len(stranded) >= 2  # SIGKILL gives the process no chance to end its runs

    run_sweep(_options(tiny_model, cifar_dir, variants=("ort-uint8",)))
    after = {r.info.run_id: r for r in all_runs()}
    for run_id in stranded:
        assert after[run_id].info.status == "FAILED"
        assert f"process {proc.pid}" in after[run_id].data.tags[Tag.REASON]
    assert not [r for r in after.values() if r.info.status == "RUNNING"]


def test_orphans_are_told_by_process_start_not_by_host_and_pid_alone(tracking_store):
    """A RUNNING run of this host is an orphan only when its process, identified by pid and start (boot id, pid
    namespace, start time), is gone: a live run of another container with a pid unknown here stays RUNNING, a run
    whose pid a later process reuses ends FAILED."""
    from mlflow.tracking import MlflowClient

    from ptqflow.tracking.recovery import mark_orphans_failed
    from ptqflow.tracking.runs import process_start

    client = MlflowClient()
    experiment_id = client.create_experiment("orphans")
    host = __import__("socket").gethostname()
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    dead_pid, live_pid = exited.pid, os.getppid()
    boot, namespace, _ = process_start(os.getpid()).split("/")

    def running(name: str, pid: int, start: str) -> str:
        return client.create_run(experiment_id, run_name=name, tags={
            Tag.HOST: host, Tag.PID: str(pid), Tag.PROCESS_START: start}).info.run_id

    other_container = running("other container", dead_pid, f"{boot}/{int(namespace) + 1}/{12345}")
    reused_pid = running("reused pid", live_pid, f"{boot}/{namespace}/1")
    dead = running("dead", dead_pid, f"{boot}/{namespace}/12345")
    alive = running("alive", live_pid, process_start(live_pid))

    assert sorted(mark_orphans_failed(experiment_id)) == sorted([reused_pid, dead])
    status = {run_id: client.get_run(run_id).info.status for run_id in (other_container, reused_pid, dead, alive)}
    assert status == {other_container: "RUNNING", reused_pid: "FAILED", dead: "FAILED", alive: "RUNNING"}
    assert f"process {live_pid}" in client.get_run(reused_pid).data.tags[Tag.REASON]
