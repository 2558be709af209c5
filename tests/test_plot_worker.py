"""The sweep's background plot process (ptqflow.pipelines.reports.plot_worker): drawn elsewhere, the same bytes, nothing lost."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from ptqflow.pipelines.reports import plots
from ptqflow.pipelines.reports.plot_worker import NICENESS, PlotWorker


def drawn_where(tag: str) -> bytes:
    """A stand-in plot: which process drew it."""
    return f"{tag}:{os.getpid()}".encode()


def worker_state(_: str) -> bytes:
    """A stand-in plot: how the process drawing it treats Ctrl-C, and its niceness."""
    return f"{signal.getsignal(signal.SIGINT) == signal.SIG_IGN}:{os.nice(0)}".encode()


def fails(message: str) -> bytes:
    raise ValueError(message)


def sleeps(seconds: str) -> bytes:
    time.sleep(float(seconds))
    return seconds.encode()


def _confusion_args():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    predictions = np.where(rng.random(60) < 0.7, labels, rng.integers(0, 3, 60))
    return labels, predictions, ("cat", "dog", "frog"), "x: confusion matrix (60 test images)"


def test_background_plots_are_drawn_in_another_process_with_the_same_bytes():
    with PlotWorker() as worker:
        assert worker.background
        pending = [worker.submit(drawn_where, str(i)) for i in range(3)]
        confusion = worker.submit(plots.confusion_matrix, *_confusion_args())
        pids = {p.result().decode().split(":")[1] for p in pending}
        assert pids and str(os.getpid()) not in pids
        assert [p.result().decode().split(":")[0] for p in pending] == ["0", "1", "2"]
        assert confusion.result() == plots.confusion_matrix(*_confusion_args())


def test_one_process_draws_for_every_sweep_of_this_process():
    with PlotWorker() as first:
        drawn_first = first.submit(drawn_where, "first").result()
    with PlotWorker() as second:
        drawn_second = second.submit(drawn_where, "second").result()
    worker_pid = drawn_first.decode().split(":")[1]
    assert worker_pid != str(os.getpid()) and drawn_second.decode().split(":")[1] == worker_pid


def test_leaving_cancels_the_plots_not_yet_started():
    with PlotWorker() as worker:
        worker.submit(sleeps, "0.5")
        queued = [worker.submit(drawn_where, str(i)) for i in range(4)]
    with pytest.raises(CancelledError):
        queued[-1].result()
    with PlotWorker() as worker:  # the process goes on for the next sweep
        assert worker.submit(drawn_where, "next").result().startswith(b"next:")


def test_the_worker_leaves_ctrl_c_to_the_sweep_and_yields_the_cpu():
    with PlotWorker() as worker:
        ignores_ctrl_c, niceness = worker.submit(worker_state, "").result().decode().split(":")
    assert ignores_ctrl_c == "True" and int(niceness) >= min(19, os.nice(0) + NICENESS)


def test_a_drawing_error_reaches_whoever_waits_for_the_plot():
    with PlotWorker() as worker:
        with pytest.raises(ValueError, match="no data"):
            worker.submit(fails, "no data").result()
        assert worker.submit(drawn_where, "after").result().startswith(b"after:")  # the process goes on


def test_a_dead_worker_loses_no_plot():
    with PlotWorker() as worker:
        first = worker.submit(drawn_where, "first").result()
        os.kill(int(first.decode().split(":")[1]), signal.SIGKILL)
        # in flight when it died, and submitted after: both drawn here instead
        assert worker.submit(drawn_where, "late").result() == f"late:{os.getpid()}".encode()
        assert worker.submit(drawn_where, "later").result() == f"later:{os.getpid()}".encode()
        assert not worker.background


def test_a_function_the_worker_cannot_import_is_drawn_here():
    def nested(tag: str) -> bytes:
        return drawn_where(tag)

    with PlotWorker() as worker:
        assert worker.submit(nested, "nested").result() == f"nested:{os.getpid()}".encode()
        assert worker.background  # the worker stays for the functions it can import


def test_without_background_plots_are_drawn_here():
    worker = PlotWorker(background=False)
    assert not worker.background
    assert worker.submit(drawn_where, "here").result() == f"here:{os.getpid()}".encode()


def unreadable_confusion(labels, predictions, class_names, title) -> bytes:
    raise ValueError(f"cannot draw {title}")


def test_a_plot_that_cannot_be_drawn_is_a_tag_on_its_run_and_the_sweep_goes_on(tracking_store, cifar_dir,
                                                                                tiny_model, monkeypatch):
    from conftest import CALIBRATION_SIZE, runs_by_name
    from mlflow.tracking import MlflowClient

    from ptqflow.pipelines.sweep.options import SweepOptions

    from ptqflow.pipelines.sweep.sweep import run_sweep
    from ptqflow.tracking.keys import Artifact, Tag

    monkeypatch.setattr(plots, "confusion_matrix", unreadable_confusion)  # drawn by name in the worker
    result = run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir, variants=("ort-int8",),
                                    calibration_size=CALIBRATION_SIZE, weight_rounding="nearest", bench=False,
                                    register=False))
    assert [o.status for o in result.outcomes] == ["ok", "ok"]
    for name, run in runs_by_name().items():
        if name in ("fp32", "ort-int8"):
            assert run.info.status == "FINISHED"
            assert run.data.tags[Tag.WARNING] == (f"{Artifact.CONFUSION_MATRIX}: ValueError: cannot draw {name}: "
                                                  f"confusion matrix ({len(result.outcomes[0].evaluation.predictions)} test images)")
            artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
            assert Artifact.CONFUSION_MATRIX not in artifacts and Artifact.PER_CLASS_ACCURACY in artifacts
    diagnosis = {a.path for a in MlflowClient().list_artifacts(result.outcomes[1].run_id, "diagnosis")}
    assert Artifact.DIAGNOSIS_PLOT in diagnosis  # the other plots were drawn and logged


def test_a_stopped_sweep_logs_the_plots_of_the_runs_that_ended(tracking_store, cifar_dir, tiny_model, monkeypatch):
    """Ctrl-C while the second variant runs: the first one's run ended FINISHED, its plots still drawing in the
    worker; they are logged before the sweep stops."""
    from conftest import CALIBRATION_SIZE, runs_by_name
    from mlflow.tracking import MlflowClient

    from ptqflow.pipelines.sweep.options import SweepOptions

    from ptqflow.pipelines.sweep.sweep import run_sweep
    from ptqflow.pipelines.variants.runner import VariantRunner
    from ptqflow.tracking.keys import Artifact

    real_run = VariantRunner.run

    def stopped_at_the_second(self, spec, store=None):
        if spec.name == "ort-int8-u8s8":
            raise KeyboardInterrupt
        return real_run(self, spec, store)

    monkeypatch.setattr(VariantRunner, "run", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir, variants=("ort-int8", "ort-int8-u8s8"),
                               calibration_size=CALIBRATION_SIZE, weight_rounding="nearest", bench=False,
                               register=False))
    runs = runs_by_name()
    statuses = {name: run.info.status for name, run in runs.items()}
    assert (statuses["fp32"], statuses["ort-int8"], statuses["ort-int8-u8s8"]) == ("FINISHED", "FINISHED", "KILLED")
    client = MlflowClient()
    first = {a.path for a in client.list_artifacts(runs["ort-int8"].info.run_id)}
    assert Artifact.CONFUSION_MATRIX in first
    assert Artifact.DIAGNOSIS_PLOT in {a.path for a in client.list_artifacts(runs["ort-int8"].info.run_id,
                                                                             "diagnosis")}


def test_the_worker_ends_when_the_sweep_process_is_killed(tmp_path):
    """SIGKILL (the OOM killer, a CI timeout) gives the sweep no chance to stop its worker: the worker notices its
    parent is gone and exits instead of waiting for a task forever."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "sweep_stand_in.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path[:0] = [{str(Path(__file__).resolve().parents[1])!r}, {str(Path(__file__).resolve().parent)!r}]\n"
        "from ptqflow.pipelines.reports.plot_worker import PlotWorker\n"
        "from test_plot_worker import drawn_where\n"
        "if __name__ == '__main__':\n"
        "    worker = PlotWorker()\n"
        "    print(worker.submit(drawn_where, 'x').result().decode().split(':')[1], flush=True)\n"
        "    time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(parent.stdout.readline())
        assert worker_pid != parent.pid
        os.kill(worker_pid, 0)  # alive
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(worker_pid, signal.SIGKILL)
    pytest.fail(f"plot worker {worker_pid} outlived its killed sweep by 10 s")


def test_a_script_without_a_main_guard_runs_once(tmp_path):
    """A user's script that starts a sweep at its top level, without `if __name__ == "__main__":`: the spawned
    plot worker must not run it again (it did, and swept a second time)."""
    import subprocess
    import sys

    marker = tmp_path / "runs.txt"
    script = tmp_path / "user_script.py"
    script.write_text(
        "import os\n"
        f"with open({str(marker)!r}, 'a') as f:\n"
        "    f.write(f'{os.getpid()}\\n')\n"
        "from ptqflow.pipelines.reports.plot_worker import PlotWorker\n"
        "from ptqflow.pipelines.reports import plots\n"
        "import numpy as np\n"
        "with PlotWorker() as worker:\n"
        "    assert worker.background\n"
        "    labels = np.array([0, 1, 2, 1])\n"
        "    png = worker.submit(plots.confusion_matrix, labels, labels, ('a', 'b', 'c'), 't').result()\n"
        "    assert png.startswith(b'\\x89PNG')\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(marker.read_text().splitlines()) == 1, marker.read_text()
