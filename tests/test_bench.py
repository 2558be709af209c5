"""Latency/throughput measurement, `ptqflow bench`, and the phase timer."""

from __future__ import annotations

import time

import numpy as np
from typer.testing import CliRunner

from ptqflow.models.runtime.latency import BATCH_THROUGHPUT, BenchConfig, benchmark, benchmark_against, benchmark_rounds
from ptqflow.pipelines.cli.app import app
from ptqflow.pipelines.variants.phases import PHASES, PhaseTimer


def test_benchmark_times_single_images_and_full_batches():
    seen = []

    def predict(batch):
        seen.append(batch.shape[0])
        time.sleep(0.0005 * batch.shape[0] ** 0.5)
        return batch

    images = np.zeros((10, 32, 32, 3), dtype=np.float32)
    config = BenchConfig(warmup_runs=3, latency_runs=20, throughput_runs=4, threads=1)
    result = benchmark(lambda threads: predict, images, config)
    assert seen.count(1) == 3 + 20 and seen.count(BATCH_THROUGHPUT) == 1 + 4  # warm-up + timed
    assert 0.4 < result.latency_ms_b1_p50 <= result.latency_ms_b1_p90
    # 256 images take ~8 ms here, so throughput is far below 256 / 0.5 ms.
    assert 10_000 < result.throughput_ips_b256 < 256 / 0.0005
    assert result.threads == 1


def test_benchmark_runs_torch_on_the_threads_it_records():
    """A sweep records bench_threads: torch (TorchScript variants) must run on that many while timed, and only then."""
    import torch

    seen = set()

    def predict(batch):
        seen.add(torch.get_num_threads())
        return batch

    before = torch.get_num_threads()
    threads = 1 if before > 1 else 2
    result = benchmark(lambda threads: predict, np.zeros((3, 32, 32, 3), dtype=np.float32),
                       BenchConfig(warmup_runs=2, latency_runs=5, throughput_runs=2, threads=threads,
                                   latency_threads=threads))
    assert seen == {threads} and result.threads == threads
    assert torch.get_num_threads() == before


def test_the_runner_opens_every_timed_session_on_the_recorded_threads(tmp_path, monkeypatch):
    from dataclasses import replace

    from conftest import tiny_runner

    from ptqflow.models.runtime import runners

    opened = []
    real_init = runners.OrtRunner.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        opened.append(self.session.get_session_options().intra_op_num_threads)

    monkeypatch.setattr(runners.OrtRunner, "__init__", recording_init)
    runner = tiny_runner(tmp_path, "threads", images=8)
    threads = 1 if runners.cpu_threads() > 1 else 2
    runner.options = replace(runner.options, bench=True, bench_config=BenchConfig(
        warmup_runs=2, latency_runs=4, throughput_runs=2, rounds=1, threads=threads))
    model_file = tmp_path / "tiny.onnx"
    timed = runner.bench_together([("copy", model_file, "", 0)])
    # batches on the recorded threads; single images on one thread or those, whichever each model answered faster
    assert opened and set(opened) <= {1, threads} and threads in opened
    assert {r.threads for r in timed.results.values()} == {threads}
    assert {r.latency_threads for r in timed.results.values()} <= {1, threads}


def test_benchmark_times_each_batch_size_on_a_freshly_loaded_model():
    """oneDNN int8 convs keep a primitive for the first input shape only, so a model loaded once and run at both
    batch sizes would be timed at batch 1 on the slow path."""
    loaded = []

    def load(threads):
        shapes = []
        loaded.append(shapes)
        return lambda batch: shapes.append(batch.shape[0]) or batch

    benchmark(load, np.zeros((3, 32, 32, 3), dtype=np.float32),
              BenchConfig(warmup_runs=2, latency_runs=5, throughput_runs=2, threads=1))  # one thread: no choice
    assert len(loaded) == 2
    assert set(loaded[0]) == {1} and set(loaded[1]) == {BATCH_THROUGHPUT}


def test_single_images_run_on_the_thread_count_the_model_answers_fastest_on():
    """Two candidates (one thread and all cores), each freshly loaded and timed in interleaved rounds; more threads
    win only when clearly faster, and the timing then runs single images on the chosen count, batches on all."""
    from ptqflow.models.runtime.latency import choose_latency_threads

    loaded = []

    def loader(seconds_by_threads):
        def load(threads):
            loaded.append(threads)
            return lambda batch: time.sleep(seconds_by_threads[threads]) or batch
        return load

    images = np.zeros((2, 8, 8, 3), dtype=np.float32)
    config = BenchConfig(warmup_runs=2, latency_runs=6, throughput_runs=2, threads=4)
    assert config.latency_candidates() == (1, 4)
    assert choose_latency_threads(loader({1: 0.0006, 4: 0.0001}), images, config) == 4
    assert loaded == [1, 4, 1, 4]  # interleaved rounds, a fresh load each
    assert choose_latency_threads(loader({1: 0.0001, 4: 0.0006}), images, config) == 1
    assert choose_latency_threads(loader({1: 0.0003, 4: 0.0003}), images, config) == 1  # a tie: fewer threads
    loaded.clear()
    result = benchmark(loader({1: 0.0001, 4: 0.0006}), images, config)
    assert result.latency_threads == 1 and result.threads == 4
    assert loaded[-2:] == [1, 4]  # single images on the chosen count, then the batches on all of them
    assert BenchConfig(threads=4, latency_threads=2).latency_candidates() == (2,)


def test_benchmark_against_alternates_fresh_loads_and_takes_each_ratio_within_its_round():
    loads, calls = [], {"model": [], "reference": []}

    def loader(name, seconds):
        def load(threads):
            loads.append(name)

            def predict(batch):
                calls[name].append(batch.shape[0])
                time.sleep(seconds * batch.shape[0] ** 0.5)
                return batch
            return predict
        return load

    images = np.zeros((4, 32, 32, 3), dtype=np.float32)
    config = BenchConfig(warmup_runs=6, latency_runs=30, throughput_runs=6, threads=1, rounds=3)
    result = benchmark_against(loader("model", 0.0002), loader("reference", 0.0008), images, config)
    # reference then model, a fresh load per batch size, round after round
    assert loads == ["reference", "reference", "model", "model"] * 3
    for name in calls:  # the runs are split between the rounds: 30 single images and 6 full batches in all
        assert calls[name].count(1) == 3 * (2 + 10) and calls[name].count(BATCH_THROUGHPUT) == 3 * (1 + 2)
    assert result.rounds == result.reference.rounds == 3
    low, high = result.speedup_b256_range
    assert low <= result.speedup_b256 <= high and result.speedup_b1_range[0] <= result.speedup_b1
    # the model sleeps a quarter of the reference's time: faster in every round, whatever else runs here
    assert low > 1 and result.speedup_b1_range[0] > 1
    assert result.reference.throughput_ips_b256 < result.throughput_ips_b256


def test_benchmark_rounds_times_the_reference_once_per_round_for_every_model():
    loads, turns = [], []

    def loader(name, seconds, fails=False):
        def load(threads):
            loads.append(name)
            if fails:
                raise RuntimeError("cannot run here\nsecond line")
            return lambda batch: time.sleep(seconds * batch.shape[0] ** 0.5) or batch
        return load

    images = np.zeros((4, 32, 32, 3), dtype=np.float32)
    config = BenchConfig(warmup_runs=6, latency_runs=30, throughput_runs=6, threads=1, rounds=3)
    result = benchmark_rounds({"fast": loader("fast", 0.0002), "fp32": loader("fp32", 0.0008),
                               "slow": loader("slow", 0.003), "broken": loader("broken", 0.0, fails=True)},
                              "fp32", images, config, advance=turns.append)
    # the reference first, then each model in turn (the one that failed leaves after its first turn)
    assert loads == ["fp32", "fp32", "fast", "fast", "slow", "slow", "broken"] + \
        ["fp32", "fp32", "fast", "fast", "slow", "slow"] * 2
    assert len(turns) == 3 * 4 - 2
    assert result.failed == {"broken": "RuntimeError: cannot run here"}
    assert set(result.results) == {"fp32", "fast", "slow"}
    reference = result.results["fp32"]
    assert reference.rounds == 3 and reference.speedup_b1 is None and reference.reference is None
    fast, slow = result.results["fast"], result.results["slow"]
    # both against the same FP32 rounds, each ratio within its round
    assert fast.reference == slow.reference == reference
    assert fast.speedup_b256_range[0] > 1 > slow.speedup_b256_range[1]
    assert fast.speedup_b1_range[0] > 1 > slow.speedup_b1_range[1]


def test_phase_timer_counts_nested_blocks_once():
    timer = PhaseTimer()
    with timer.phase("quantize"):
        with timer.phase("evaluate"):
            time.sleep(0.02)
    with timer.phase("evaluate"):
        time.sleep(0.01)
    summary = timer.summary()
    assert set(PHASES) | {"total"} == set(summary)
    assert summary["quantize"] >= 0.02 and 0.01 <= summary["evaluate"] < 0.02
    assert summary["total"] >= summary["quantize"] + summary["evaluate"]


def test_bench_command_on_a_model_file(tiny_model, cifar_dir):
    result = CliRunner().invoke(app, ["bench", str(tiny_model), "--data-dir", str(cifar_dir), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "resnet8.onnx" in result.stdout and "b256 img/s" in result.stdout


def test_bench_command_refuses_run_id_with_several_targets(tiny_model, cifar_dir):
    result = CliRunner().invoke(app, ["bench", str(tiny_model), str(tiny_model), "--data-dir", str(cifar_dir),
                                      "--run-id", "abc"])
    assert result.exit_code != 0 and "single target" in result.stderr


def test_bench_command_logs_to_a_run(tracking_store, tiny_model, cifar_dir):
    import mlflow
    from mlflow.tracking import MlflowClient

    with mlflow.start_run() as run:
        pass
    result = CliRunner().invoke(app, ["bench", str(tiny_model), "--data-dir", str(cifar_dir), "--threads", "1",
                                      "--run-id", run.info.run_id])
    assert result.exit_code == 0, result.output
    logged = MlflowClient().get_run(run.info.run_id).data
    assert logged.metrics["latency_ms_b1_p50"] > 0 and logged.metrics["throughput_ips_b256"] > 0
    assert logged.params["bench_threads"] == "1"


def test_bench_run_id_replaces_the_whole_timing_record_rounded_with_fresh_speedups(tracking_store, tiny_model,
                                                                                  cifar_dir, tmp_path):
    """A sweep's variant timed again: every timing metric is the new one, at its recorded precision, the speedups
    are measured beside the sweep's FP32 model again, and the contended flag and tag agree with the new timing."""
    from mlflow.tracking import MlflowClient

    from ptqflow.pipelines.shared.precision import round_metric
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep
    from ptqflow.tracking.keys import Metric, Tag

    result = run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir, calibration_size=100,
                                    variants=("ort-uint8",), weight_rounding="nearest", register=False,
                                    diagnose=False), work_dir=tmp_path / "work")
    variant = result.outcomes[1]
    client = MlflowClient()
    client.set_tag(variant.run_id, Tag.BENCH_CONTENDED, "from the sweep's timing")  # as a busy sweep leaves it
    cli = CliRunner().invoke(app, ["bench", str(variant.model_file), "--data-dir", str(cifar_dir),
                                   "--run-id", variant.run_id, "--output", str(tmp_path / "pulled")])
    assert cli.exit_code == 0, cli.output
    run = client.get_run(variant.run_id)
    for key in (Metric.LATENCY_MS_B1_P50, Metric.LATENCY_MS_B1_P90, Metric.THROUGHPUT_IPS_B256,
                Metric.SPEEDUP_VS_FP32_B1, Metric.SPEEDUP_VS_FP32_B256, Metric.FP32_LATENCY_MS_B1_P50,
                Metric.SPREAD_B1, Metric.BENCH_CONTENDED):
        history = client.get_metric_history(variant.run_id, key)
        assert len(history) == 2, key  # the sweep's, then bench's: none left from the old timing
        assert run.data.metrics[key] == round_metric(key, run.data.metrics[key]), key
    contended = run.data.metrics[Metric.BENCH_CONTENDED] == 1
    assert (Tag.BENCH_CONTENDED in run.data.tags) == contended
    assert "beside FP32" in run.data.tags[Tag.BENCH_RETIMED]


def test_bench_run_id_on_a_fixed_batch_model_logs_no_throughput(tracking_store, tmp_path, cifar_dir):
    import mlflow
    import onnx
    from mlflow.tracking import MlflowClient
    from onnx_fixture import tiny_cnn

    from ptqflow.tracking.keys import Metric

    model = tiny_cnn()
    for value_info in (*model.graph.input, *model.graph.output):
        value_info.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    with mlflow.start_run() as run:
        pass
    cli = CliRunner().invoke(app, ["bench", str(tmp_path / "fixed.onnx"), "--data-dir", str(cifar_dir), "--threads",
                                   "1", "--run-id", run.info.run_id])
    assert cli.exit_code == 0, cli.output
    metrics = MlflowClient().get_run(run.info.run_id).data.metrics
    assert metrics[Metric.LATENCY_MS_B1_P50] > 0 and Metric.THROUGHPUT_IPS_B256 not in metrics


def test_bench_run_id_refuses_other_threads_than_the_run_was_timed_on(tracking_store, tiny_model, cifar_dir):
    import mlflow
    from mlflow.tracking import MlflowClient

    with mlflow.start_run() as run:
        mlflow.log_param("bench_threads", 3)
    cli = CliRunner().invoke(app, ["bench", str(tiny_model), "--data-dir", str(cifar_dir), "--threads", "1",
                                   "--run-id", run.info.run_id])
    assert cli.exit_code != 0 and "pass --threads 3" in cli.stderr and "Traceback" not in cli.output
    assert "latency_ms_b1_p50" not in MlflowClient().get_run(run.info.run_id).data.metrics


def test_latency_threads_fixes_every_models_batch_1_threads_and_records_them(tracking_store, tiny_model, cifar_dir):
    """`--latency-threads 1` (one request per core): every model answers single images on one thread, its run says
    so, and an ONNX model's MLmodel carries it as its onnxruntime session options; the resume key changes with it."""
    import mlflow
    import yaml

    from ptqflow import quantize
    from ptqflow.tracking.keys import Param, Tag
    from conftest import CALIBRATION_SIZE, all_runs, runs_by_name

    quantize(tiny_model, cifar_dir, ["ort-int8"], calibration_size=CALIBRATION_SIZE, register=False,
             diagnose=False, latency_threads=1, weight_rounding="nearest")
    runs = runs_by_name()
    for name in ("fp32", "ort-int8"):
        assert runs[name].data.params[Param.LATENCY_THREADS] == "1"
    [output] = runs["ort-int8"].outputs.model_outputs
    logged = mlflow.MlflowClient().get_logged_model(output.model_id)
    options = yaml.safe_load(mlflow.artifacts.load_text(f"{logged.artifact_location}/MLmodel"))["flavors"]["onnx"]
    assert options["onnx_session_options"]["intra_op_num_threads"] == 1
    first_key = runs["ort-int8"].data.tags[Tag.INPUT_KEY]
    quantize(tiny_model, cifar_dir, ["ort-int8"], calibration_size=CALIBRATION_SIZE, register=False,
             diagnose=False, latency_threads=2, weight_rounding="nearest", run_name="two threads")
    keys = {r.data.tags[Tag.INPUT_KEY] for r in all_runs() if r.data.tags.get(Tag.VARIANT) == "ort-int8"}
    assert len(keys) == 2 and first_key in keys
