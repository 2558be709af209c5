"""The CLI as a user meets it: one clear line and a non-zero exit for bad input, nothing left RUNNING."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cifar_fixture import batch_bytes
from conftest import CALIBRATION_SIZE, all_runs, runs_by_name
from onnx_fixture import write_tiny_cnn
from typer.testing import CliRunner

from ptqflow.pipelines.shared.choices import VARIANT_NAMES
from ptqflow.pipelines.cli.app import app
from ptqflow.tracking.keys import Tag

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def sweep_args(model: Path, data_dir: Path, *extra) -> list:
    return ["sweep", "--model", model, "--data-dir", data_dir, "--calibration-size", CALIBRATION_SIZE,
            "--weight-rounding", "nearest", *extra]


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_nothing_running() -> None:
    assert not [r for r in all_runs() if r.info.status == "RUNNING"]


@pytest.fixture()
def data_copy(cifar_dir, tmp_path) -> Path:
    target = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar_dir, target)
    return target


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("sweep", "baseline", "quantize", "pull", "compare"):
        assert command in result.output


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from typer.testing import CliRunner; from ptqflow.pipelines.cli.app import app; "
            "CliRunner().invoke(app, ['sweep', '--help']); "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'mlflow', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_model_file(tracking_store, cifar_dir):
    result = invoke(*sweep_args(tracking_store / "nope.onnx", cifar_dir))
    assert_one_line_error(result, "nope.onnx", "--model")
    assert all_runs() == []


def test_missing_data_dir(tracking_store, tiny_model):
    result = invoke(*sweep_args(tiny_model, tracking_store / "nowhere"))
    assert_one_line_error(result, "nowhere", "--data-dir")


def test_file_that_is_not_onnx(tracking_store, cifar_dir):
    bogus = tracking_store / "model.onnx"
    bogus.write_text("definitely not protobuf \x00\x01\x02")
    assert_one_line_error(invoke(*sweep_args(bogus, cifar_dir)), "not a readable ONNX model")


def test_model_whose_input_does_not_fit_the_data(tracking_store, cifar_dir):
    model = write_tiny_cnn(tracking_store / "wrong.onnx", input_shape=["N", 28, 28, 1])
    assert_one_line_error(invoke(*sweep_args(model, cifar_dir)), "1-channel", "3-channel")
    model = write_tiny_cnn(tracking_store / "wrong.onnx", input_shape=["N", 28, 28, 2])
    assert_one_line_error(invoke(*sweep_args(model, cifar_dir)), "[N,28,28,2]", "1 or 3 channels")
    assert all_runs() == []


def test_missing_batch(tracking_store, tiny_model, data_copy):
    (data_copy / "data_batch_3").unlink()
    assert_one_line_error(invoke(*sweep_args(tiny_model, data_copy)), "data_batch_3")


def test_truncated_batch(tracking_store, tiny_model, data_copy):
    batch = data_copy / "test_batch"
    batch.write_bytes(batch.read_bytes()[:5000])
    assert_one_line_error(invoke(*sweep_args(tiny_model, data_copy)), "test_batch")
    assert_nothing_running()


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_batch_whose_pickle_calls_a_function_is_refused_without_running_it(tracking_store, tiny_model, data_copy):
    marker = tracking_store / "pwned"
    (data_copy / "data_batch_1").write_bytes(pickle.dumps({b"data": _Exploit(marker), b"labels": [0]}, protocol=2))
    result = invoke(*sweep_args(tiny_model, data_copy))
    assert_one_line_error(result, "data_batch_1", "not allowed")
    assert not marker.exists()


def test_labels_outside_0_to_9(tracking_store, tiny_model, data_copy):
    images = np.zeros((3, 3072), dtype=np.uint8)
    (data_copy / "test_batch").write_bytes(batch_bytes(images, [0, 12, 3]))
    assert_one_line_error(invoke(*sweep_args(tiny_model, data_copy)), "label 12")


def test_calibration_size_larger_than_the_training_set(tracking_store, tiny_model, cifar_dir):
    result = invoke("sweep", "--model", tiny_model, "--data-dir", cifar_dir, "--calibration-size", 5000)
    assert_one_line_error(result, "--calibration-size")


def test_calibration_size_smaller_than_the_class_count(tracking_store, tiny_model, cifar_dir):
    result = invoke("sweep", "--model", tiny_model, "--data-dir", cifar_dir, "--calibration-size", 5)
    assert_one_line_error(result, "smaller than the 10 classes")


def test_unknown_variant(tracking_store, tiny_model, cifar_dir):
    result = invoke(*sweep_args(tiny_model, cifar_dir, "--variant", "tflite-int4"))
    assert_one_line_error(result, "tflite-int4")
    assert_nothing_running()


def test_pull_of_a_version_that_does_not_exist(tracking_store):
    assert_one_line_error(invoke("pull", "resnet8-int8", "--version", "7"), "resnet8-int8")


def test_unexpected_exception_fails_that_variant_only(tracking_store, tiny_model, cifar_dir, monkeypatch):
    from ptqflow.models.backends import ort as quantize_ort

    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash inside the ORT backend")

    monkeypatch.setattr(quantize_ort, "quantize", broken)
    result = invoke(*sweep_args(tiny_model, cifar_dir, "--variant", "ort-int8", "--variant", "pytorch-fx-int8",
                                "--no-register"))
    assert result.exit_code == 1
    assert "ort-int8" in result.stderr and "simulated crash" in result.stderr
    runs = runs_by_name()
    assert runs["ort-int8"].info.status == "FAILED"
    assert runs["pytorch-fx-int8"].info.status == "FINISHED"
    assert runs["fp32"].info.status == "FINISHED"
    parent = next(r for r in runs.values() if r.data.tags.get("ptqflow.role") == "sweep")
    assert parent.info.status == "FAILED"
    assert_nothing_running()


def test_sweep_cli_prints_the_table_and_compare_reprints_it(tracking_store, tiny_model, cifar_dir):
    result = invoke(*sweep_args(tiny_model, cifar_dir, "--variant", "ort-uint8", "--no-register"))
    assert result.exit_code == 0, result.output
    assert "ort-uint8" in result.stdout and "fp32" in result.stdout
    compared = invoke("compare")
    assert compared.exit_code == 0, compared.output
    assert "ort-uint8" in compared.stdout


@pytest.mark.slow
def test_sigterm_ends_open_runs_as_killed(tracking_store, tiny_model, cifar_dir):
    import mlflow

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    assert all_runs() == []  # creates the store's tables now, not concurrently with the subprocess
    proc = subprocess.Popen([sys.executable, "-m", "ptqflow", *map(str, sweep_args(tiny_model, cifar_dir))],
                            cwd=tracking_store, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a variant run is in progress
        running = [r for r in all_runs() if r.info.status == "RUNNING" and r.info.run_name != "fp32"
                   and r.data.tags.get("ptqflow.role") == "variant"]
        if running:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "stopping at the next safe point" in stderr
    assert "interrupted" in stderr and "Traceback" not in stderr and "Exception ignored" not in stderr
    runs = all_runs()
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    parents = [r for r in runs if r.data.tags.get(Tag.ROLE) == Tag.ROLE_SWEEP]
    assert [p.info.status for p in parents] == ["KILLED"]
    variants = [r for r in runs if r.data.tags.get(Tag.ROLE) == Tag.ROLE_VARIANT]
    # The stop lands at the next safe point: inside the variant in progress (KILLED) or, if that one had
    # passed its last one, before the next variant starts. Either way the sweep ends early.
    assert {r.info.status for r in variants} <= {"FINISHED", "FAILED", "KILLED"}
    assert len(variants) < 1 + len(VARIANT_NAMES)  # fp32 and every variant
    assert all(r.info.end_time for r in runs)


@pytest.mark.parametrize("args,fragment", [
    (["--experiment", "../etc"], "--experiment"),
    (["--registered-model", "a/b"], "--registered-model"),
    (["--registered-onnx-model", "x#y"], "--registered-onnx-model"),
])
def test_names_with_path_or_uri_characters_are_refused(tracking_store, tiny_model, cifar_dir, args, fragment):
    assert_one_line_error(invoke(*sweep_args(tiny_model, cifar_dir, *args)), fragment)
    assert all_runs() == []


@pytest.mark.parametrize("args,fragment", [
    (["pull", "../model", "--version", "1"], "registered model name"),
    (["pull", "resnet8-int8@v1"], "alias"),
    (["promote", "resnet8-int8", "1", "--alias", "a/b"], "alias"),
])
def test_pull_and_promote_refuse_unsafe_names(tracking_store, args, fragment):
    assert_one_line_error(invoke(*args), fragment)


def test_baseline_command_logs_only_the_fp32_run(tracking_store, tiny_model, cifar_dir):
    result = invoke("baseline", "--model", tiny_model, "--data-dir", cifar_dir)
    assert result.exit_code == 0, result.output
    variants = {name for name, r in runs_by_name().items() if r.data.tags.get("ptqflow.role") == "variant"}
    assert variants == {"fp32"}
    metrics = runs_by_name()["fp32"].data.metrics
    assert metrics["fp32_torch_vs_ort_agreement"] == 1.0
    # the conversion is checked on the first 1,000 test images; the fixture has fewer, so on all of them
    assert metrics["fp32_torch_vs_ort_images"] == metrics["test_images"] == 100


@pytest.mark.parametrize("framework,variant", [("pytorch", "pytorch-fx-int8-x86"), ("ort", "ort-int8-u8s8")])
def test_quantize_commands_run_one_framework(tracking_store, tiny_model, cifar_dir, framework, variant):
    result = invoke("quantize", framework, "--model", tiny_model, "--data-dir", cifar_dir, "--calibration-size",
                    CALIBRATION_SIZE, "--variant", variant, "--weight-rounding", "nearest", "--no-bench",
                    "--no-register")
    assert result.exit_code == 0, result.output
    runs = runs_by_name()
    assert runs[variant].info.status == "FINISHED" and runs["fp32"].info.status == "FINISHED"
    assert not {"pytorch-fx-int8", "ort-uint8"} & set(runs)


def test_quantize_refuses_a_variant_of_the_other_framework(tracking_store, tiny_model, cifar_dir):
    result = invoke("quantize", "ort", "--model", tiny_model, "--data-dir", cifar_dir, "--variant", "pytorch-fx-int8")
    assert_one_line_error(result, "pytorch-fx-int8")


def test_default_paths_offline_give_one_line_naming_the_url_and_the_flags(tracking_store, cifar_dir):
    # tracking_store is the working directory: it has no data/models/resnet8.onnx, so the sweep tries to fetch it.
    unreachable = "http://127.0.0.1:9/pretrainedResnet.h5"  # port 9 (discard) refuses connections here
    result = invoke("sweep", "--data-dir", cifar_dir, "--resnet8-url", unreachable)
    assert_one_line_error(result, unreachable, "--model")
    assert not (tracking_store / "data" / "models" / "resnet8.onnx").exists()


def test_no_fetch_names_the_missing_default_and_what_to_pass(tracking_store, cifar_dir):
    assert_one_line_error(invoke("sweep", "--data-dir", cifar_dir, "--no-fetch"), "data/models/resnet8.onnx", "--model")


def test_baseline_checks_the_conversion_on_the_first_images_only(tracking_store, tiny_model, cifar_dir, monkeypatch):
    from ptqflow.pipelines.variants import runner as variant_runner

    monkeypatch.setattr(variant_runner, "TORCH_CHECK_IMAGES", 30)
    result = invoke("baseline", "--model", tiny_model, "--data-dir", cifar_dir)
    assert result.exit_code == 0, result.output
    metrics = runs_by_name()["fp32"].data.metrics
    assert metrics["fp32_torch_vs_ort_images"] == 30 and metrics["test_images"] == 100
    assert metrics["fp32_torch_vs_ort_agreement"] == 1.0 and "of the first 30" in result.output


# ---- the option groups: commands that run the same part offer the same options ----------------------------------
def _offered(*path: str) -> set[str]:
    import typer

    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("--")}


GATE = {"--max-accuracy-drop", "--min-agreement", "--min-latency-gain"}
DIAGNOSIS = {"--diagnose", "--no-diagnose", "--diagnose-images"}
FALLBACK = {"--target-agreement", "--max-drop", "--ranking-images", "--fallback-candidates"}
MIRRORS = {"--cifar10-url", "--cifar10-md5", "--resnet8-url"}


def test_quantize_ort_help_lists_the_gate_resume_adaround_and_diagnosis_options():
    result = runner.invoke(app, ["quantize", "ort", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in (*GATE, "--resume", "--adaround-iterations", *DIAGNOSIS, *FALLBACK, *MIRRORS):
        assert option in result.output, option


def test_quantize_commands_offer_the_sweeps_options_for_their_framework():
    sweep = _offered("sweep")
    # The only differences: the other framework's registry name and ONNX Runtime's recipe overrides.
    assert sweep - _offered("quantize", "ort") == {"--registered-model"}
    assert sweep - _offered("quantize", "pytorch") == {"--registered-onnx-model", "--per-channel", "--per-tensor",
                                                       "--calibration-method"}
    assert _offered("quantize", "ort") <= sweep and _offered("quantize", "pytorch") <= sweep


def test_tune_and_baseline_offer_the_sweeps_input_fetch_and_tracking_options():
    sweep, tune, baseline = _offered("sweep"), _offered("tune"), _offered("baseline")
    # tune searches the recipe (size, rounding, ONNX Runtime grid and method), always times its trials (single
    # images on the thread count each model answers fastest on), and has a --target-agreement of its own (what a
    # feasible trial reaches)
    assert sweep - tune == {"--variant", "--calibration-size", "--weight-rounding", "--equalization", "--no-speed-check",
                            "--per-channel",
                            "--per-tensor", "--calibration-method", "--bench", "--no-bench", "--latency-threads",
                            "--resume", *DIAGNOSIS, *FALLBACK - {"--target-agreement"}}
    assert MIRRORS | GATE | {"--fetch", "--no-fetch", "--adaround-iterations", "--calibration-seed"} <= tune
    # baseline runs FP32 only: no calibration, registry, gate, diagnosis or fallback; it always times FP32
    assert baseline <= sweep and MIRRORS | {"--model", "--data-dir", "--test-limit", "--experiment"} <= baseline


def test_tune_fetches_from_the_mirror_it_is_given(tracking_store, cifar_dir):
    # tracking_store is the working directory: it has no data/models/resnet8.onnx, so tune tries to fetch it.
    unreachable = "http://127.0.0.1:9/pretrainedResnet.h5"  # port 9 (discard) refuses connections here
    result = invoke("tune", "--data-dir", cifar_dir, "--resnet8-url", unreachable, "--n-trials", 1)
    assert_one_line_error(result, unreachable, "--model")
    assert not (tracking_store / "data" / "models" / "resnet8.onnx").exists()
