"""Issue 11, sections 4-5 on one machine: `ptqflow tune` searches the declared space with Optuna, every trial an
MLflow child run of one tune run, the Pareto front logged on it, the best feasible trial registered through the
gate, a study taken up again by a second worker. Several machines against PostgreSQL and a tracking server, with a
worker killed mid-trial: tests/test_tune_server.py (server suite)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from ptqflow.common.errors import ConfigError
from conftest import ADAROUND_ITERATIONS, all_runs, version_reason
from ptqflow.models.runtime.latency import BenchConfig
from ptqflow.models.backends.ort import OrtStaticConfig
from ptqflow.models.backends.pytorch_fx import PytorchFxConfig
from ptqflow.pipelines.sweep.options import SweepOptions
from ptqflow.pipelines.tune.options import TuneOptions
from ptqflow.pipelines.tune.study import PARENT_RUN_ATTR
from ptqflow.pipelines.tune.tuner import run_tune
from ptqflow.pipelines.tune.space import FORMATS, choice_of, suggest, sweep_defaults
from ptqflow.pipelines.variants.specs import VARIANTS
from ptqflow.tracking.keys import Artifact, Param, Tag

PROJECT = Path(__file__).resolve().parents[1]
SIZES = (50, 100)  # the fixture has 200 training images
QUICK_BENCH = BenchConfig(warmup_runs=3, latency_runs=30, throughput_runs=3)  # speed is an objective, not the test


def _options(model: Path, data: Path, **overrides) -> TuneOptions:
    sweep = SweepOptions(model_path=model, data_dir=data, adaround_iterations=ADAROUND_ITERATIONS)
    settings = dict(sweep=sweep, n_trials=4, target_agreement=1.0, min_speedup=0.0, stop_at_target=False,
                    calibration_sizes=SIZES, heartbeat_s=5, seed=0, bench_config=QUICK_BENCH)
    settings.update(overrides)
    return TuneOptions(**settings)


def _trial_runs(study: str) -> list:
    return [r for r in all_runs() if r.data.tags.get(Tag.TUNE_TRIAL) is not None
            and r.data.tags.get(Tag.TUNE_STUDY) == study]


# ---- the space ------------------------------------------------------------------------------------------------------
def test_the_space_replays_a_trial_and_records_only_what_runs():
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=3))
    seen_formats = set()
    for _ in range(60):
        trial = study.ask()
        choice = suggest(trial, SIZES)
        seen_formats.add(choice.format)
        # replaying the params gives the same config: how a finished trial is registered
        assert choice_of(trial.params) == choice
        config = choice.config
        # a trial never records AdaRound where the backend has no grid for it (FX per-tensor)
        if config.weight_rounding == "adaround":
            assert config.adaround_scheme is not None
        if isinstance(config, PytorchFxConfig):
            assert "ort_calibration" not in trial.params and config.fp32_modules == ()
        else:
            assert isinstance(config, OrtStaticConfig) and "fx_observer" not in trial.params
            assert (config.calibration_method == "Percentile") == ("percentile" in trial.params)
        assert ("upgrade_kind" in trial.params) == (choice.upgrade_layers > 0 and config.quant_format == "QDQ")
        study.tell(trial, [0.5, 1.0])
    assert seen_formats == set(FORMATS)
    # the enqueued first trials are the default sweep's best recipes, exactly
    defaults = [choice_of(p) for p in sweep_defaults(1000)]
    assert defaults[0].config == PytorchFxConfig(backend="x86")
    assert defaults[1].config.quant_format == "QOperator" and defaults[1].config.per_channel
    assert defaults[2].config == VARIANTS["ort-int8"].config


# ---- one worker ---------------------------------------------------------------------------------------------------
def test_every_trial_is_a_child_run_and_the_parent_holds_the_pareto_front(tracking_store, cifar_dir, tiny_model):
    result = run_tune(_options(tiny_model, cifar_dir, study="t1"))
    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and result.finished_parent
    assert parent.data.tags[Tag.ROLE] == Tag.ROLE_TUNE
    assert parent.data.params[Param.TUNE_N_TRIALS] == "4"
    assert Tag.PID not in parent.data.tags  # owned by no one process: never taken for an orphan
    assert parent.data.tags[Tag.TUNE_CREATED_BY].endswith(f":{__import__('os').getpid()}")
    # the study lives beside the MLflow store and knows its parent run
    storage = f"sqlite:///{tracking_store / 'optuna.db'}"
    study = optuna.load_study(study_name="t1", storage=storage)
    assert study.user_attrs[PARENT_RUN_ATTR] == result.parent_run_id
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4
    # one MLflow run per trial, each a child of the parent, no trial number twice, all ended
    trial_runs = _trial_runs("t1")
    numbers = [r.data.tags[Tag.TUNE_TRIAL] for r in trial_runs]
    assert sorted(numbers) == sorted({str(t.number) for t in finished})
    assert all(r.data.tags[Tag.MLFLOW_PARENT] == result.parent_run_id for r in trial_runs)
    assert all(r.info.status == "FINISHED" for r in trial_runs)
    # the first trials are the default sweep's recipes; each run records what the sampler chose and its backend config
    by_number = {int(r.data.tags[Tag.TUNE_TRIAL]): r for r in trial_runs}
    assert [by_number[n].data.params["tune.format"] for n in range(3)] == ["fx-x86", "ort-qop-u8s8", "ort-qdq-u8s8"]
    for number, run in by_number.items():
        trial = study.trials[number]
        assert {k: str(v) for k, v in trial.params.items()} == {
            k.removeprefix(Param.TUNE_PARAM_PREFIX): v for k, v in run.data.params.items()
            if k.startswith(Param.TUNE_PARAM_PREFIX) and k != "tune.upgraded"}
        assert float(run.data.params[Param.CALIBRATION_SIZE]) == trial.params["calibration_size"]
        # AdaRound reconstructs on one set whatever the trial's calibration size (the default size nearest 1000)
        if run.data.params.get(Param.WEIGHT_ROUNDING) == "adaround":
            assert run.data.params[Param.ADAROUND_CALIBRATION_SIZE] == "100"
        else:
            assert Param.ADAROUND_CALIBRATION_SIZE not in run.data.params
        destination = tracking_store / "downloads" / run.info.run_id
        destination.mkdir(parents=True)
        qconfig = json.loads(Path(client.download_artifacts(run.info.run_id, Artifact.QCONFIG,
                                                            str(destination))).read_text())
        choice = choice_of(trial.params)
        if not choice.upgrade_layers:  # the backend config that ran is the one the sampler chose
            assert type(choice.config).from_dict(qconfig["config"]) == choice.config
        # the objectives are the run's own metrics
        assert trial.values[0] == pytest.approx(run.data.metrics["top1_agreement"], abs=1e-9)
        assert trial.values[1] == pytest.approx(run.data.metrics["speedup_vs_fp32_b256"], rel=0.01)
        # ... the median of ratios to FP32 timed in the same rounds, whose range and FP32 side the run records
        m = run.data.metrics
        assert m["speedup_vs_fp32_b256_min"] <= m["speedup_vs_fp32_b256"] <= m["speedup_vs_fp32_b256_max"]
        assert m["fp32_throughput_ips_b256"] > 0 and run.data.params[Param.BENCH_ROUNDS] == "3"
        assert run.data.tags[Tag.TUNE_FEASIBLE] == "yes"  # 100% agreement on the tiny model, no speed floor
    # each worker's FP32 reference is a child run too
    fp32 = [r for r in all_runs() if r.data.tags.get(Tag.MLFLOW_PARENT) == result.parent_run_id
            and r.info.run_name == "fp32"]
    assert len(fp32) == 1
    # the Pareto front on the parent: table, CSV of every trial, plot, and the declared space
    artifacts = {f.path for d in ("tune",) for f in client.list_artifacts(result.parent_run_id, d)}
    assert {Artifact.TUNE_PARETO_PLOT, Artifact.TUNE_PARETO_CSV, Artifact.TUNE_PARETO_MD, Artifact.TUNE_TRIALS_CSV,
            Artifact.TUNE_SPACE} <= artifacts
    rows = list(csv.DictReader(io.StringIO(Path(client.download_artifacts(
        result.parent_run_id, Artifact.TUNE_TRIALS_CSV, str(tracking_store))).read_text())))
    assert len(rows) == 4
    front = {t.number for t in result.pareto}
    for t in result.trials:  # the front is exactly the trials no other beats on both objectives
        beaten = any(o.agreement >= t.agreement and o.speedup >= t.speedup
                     and (o.agreement > t.agreement or o.speedup > t.speedup) for o in result.trials)
        assert (t.number in front) == (not beaten)


def test_stop_at_target_registers_the_best_feasible_trial_through_the_gate(tracking_store, cifar_dir, tiny_model):
    result = run_tune(_options(tiny_model, cifar_dir, study="t2", n_trials=5, stop_at_target=True,
                               target_agreement=0.9))
    assert len(result.trials) == 1  # the first trial (FX x86, the sweep's recipe) reached the target
    assert result.best is not None and result.best.number == 0
    [version] = result.registered
    assert version.name == "resnet8-int8" and version.run_id == result.best.run_id
    assert version_reason(version.name, version.version)  # the gate decided, and said why
    assert MlflowClient().get_run(result.parent_run_id).info.status == "FINISHED"


def test_a_second_worker_takes_up_the_study_under_the_same_parent(tracking_store, cifar_dir, tiny_model):
    first = run_tune(_options(tiny_model, cifar_dir, study="t3", n_trials=1))
    second = run_tune(_options(tiny_model, cifar_dir, study="t3", n_trials=2))
    assert second.parent_run_id == first.parent_run_id
    numbers = sorted(int(r.data.tags[Tag.TUNE_TRIAL]) for r in _trial_runs("t3"))
    assert numbers == [0, 1]
    parent = MlflowClient().get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED" and first.finished_parent and second.finished_parent
    # the FINISHED parent was reopened for the second worker's trials, and the run says when and by whom
    worker = f"{__import__('socket').gethostname()}:{__import__('os').getpid()}"
    assert parent.data.tags[Tag.TUNE_REOPENED_PREFIX + "1"].endswith(f"Z by {worker}")
    assert not [k for k in parent.data.tags if k.startswith(Tag.TUNE_REOPENED_PREFIX) and not k.endswith(".1")]
    assert parent.data.tags[Tag.TUNE_ENDED_BY].startswith(f"{worker} at ")
    # the joining worker timed its own FP32 reference
    fp32 = [r for r in all_runs() if r.data.tags.get(Tag.MLFLOW_PARENT) == first.parent_run_id
            and r.info.run_name == "fp32"]
    assert len(fp32) == 2


def test_another_model_or_other_inputs_cannot_join_a_study(tracking_store, cifar_dir, tiny_model, tmp_path):
    # not registered: the other model's registry check (its own test) would refuse before the study's is reached
    run_tune(_options(tiny_model, cifar_dir, study="t4", n_trials=1,
                      sweep=SweepOptions(model_path=tiny_model, data_dir=cifar_dir, register=False,
                                         adaround_iterations=ADAROUND_ITERATIONS)))
    other = tmp_path / "other" / "resnet8.onnx"
    other.parent.mkdir()
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(tiny_model))
    weight = proto.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    onnx.save(proto, str(other))
    with pytest.raises(ConfigError, match="tunes another model"):
        run_tune(_options(other, cifar_dir, study="t4", n_trials=2))
    # the same model on other inputs: its trials would not compare with the study's
    with pytest.raises(ConfigError, match=r"other inputs \(calibration_seed, calibration_sizes: "):
        run_tune(_options(tiny_model, cifar_dir, study="t4", n_trials=2, calibration_sizes=(50,),
                          sweep=SweepOptions(model_path=tiny_model, data_dir=cifar_dir, calibration_seed=1,
                                             adaround_iterations=ADAROUND_ITERATIONS)))
    # another target: its workers would judge feasibility (stop, register) by other numbers
    with pytest.raises(ConfigError, match=r"other inputs \(min_speedup, target_agreement: 0.0 there, 1.5 here, "
                                          r"1.0 there, 0.9 here\)"):
        run_tune(_options(tiny_model, cifar_dir, study="t4", n_trials=2, target_agreement=0.9, min_speedup=1.5))
    assert all(r.info.status != "RUNNING" for r in all_runs())


def test_bad_options_are_one_line_before_anything_runs(tracking_store, cifar_dir, tiny_model):
    with pytest.raises(ConfigError, match="--n-trials"):
        _options(tiny_model, cifar_dir, n_trials=0)
    with pytest.raises(ConfigError, match="benchmarking must stay on"):
        TuneOptions(sweep=SweepOptions(model_path=tiny_model, data_dir=cifar_dir, bench=False))
    with pytest.raises(ConfigError, match="--calibration-sizes 5000 exceeds"):
        run_tune(_options(tiny_model, cifar_dir, calibration_sizes=(50, 5000)))
    # a storage that cannot be opened: one line on stderr, exit 2, no traceback, no run left RUNNING
    out = subprocess.run([sys.executable, "-m", "ptqflow", "tune", "--model", str(tiny_model), "--data-dir",
                          str(cifar_dir), "--calibration-sizes", "50,100", "--storage",
                          "postgresql://nobody:secret@127.0.0.1:1/nothing"],
                         capture_output=True, text=True, cwd=tracking_store,
                         env={**__import__("os").environ, "PYTHONPATH": str(PROJECT)})
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "tune storage" in lines[0] and "--storage" in lines[0]
    assert "secret" not in out.stderr and "Traceback" not in out.stderr
    assert all(r.info.status != "RUNNING" for r in all_runs())


def test_only_a_config_the_backend_cannot_make_is_pruned(tracking_store, cifar_dir, tiny_model, monkeypatch):
    """The backend's refusal prunes the trial and the search goes on; an error of ptqflow's own (a KeyError) is no
    result of the config: the trial ends FAIL, the worker stops with the error, the tune run KILLED, nothing
    RUNNING."""
    from ptqflow.models.backends.base import UnsupportedVariant
    from ptqflow.pipelines.variants.runner import VariantRunner

    calls = []

    def run(self, spec, store=None):
        calls.append(spec.name)
        if len(calls) == 1:
            raise UnsupportedVariant("refused by the test")
        raise KeyError("bench_rounds")  # what a bug in ptqflow's own code raises

    monkeypatch.setattr(VariantRunner, "run", run)
    with pytest.raises(KeyError, match="bench_rounds"):
        run_tune(_options(tiny_model, cifar_dir, study="t6", n_trials=3))
    study = optuna.load_study(study_name="t6", storage=f"sqlite:///{tracking_store / 'optuna.db'}")
    # the third of the default recipes enqueued stays WAITING: the worker stopped before it
    assert [t.state.name for t in study.trials] == ["PRUNED", "FAIL", "WAITING"]
    assert study.trials[0].user_attrs["failure"] == "unsupported: refused by the test"
    parent = MlflowClient().get_run(study.user_attrs[PARENT_RUN_ATTR])
    assert parent.info.status == "KILLED"
    assert all(r.info.status != "RUNNING" for r in all_runs())


def test_tune_never_registers_into_a_default_name_holding_another_model(tracking_store, cifar_dir, tiny_model):
    """As a sweep refuses to: the default registered names (`resnet8-int8`, `resnet8-int8-onnx`) hold versions of one
    FP32 model; tune checks before any run starts."""
    from ptqflow.tracking.keys import VersionTag

    client = MlflowClient()
    client.create_registered_model("resnet8-int8-onnx")
    client.create_model_version("resnet8-int8-onnx", str(tiny_model), tags={VersionTag.FP32_MODEL_SHA256: "0" * 64})
    with pytest.raises(ConfigError, match="'resnet8-int8-onnx' holds versions of another FP32 model"):
        run_tune(_options(tiny_model, cifar_dir, study="t7", n_trials=1))
    assert all_runs() == []
    # named explicitly, the versions go where the user says
    options = _options(tiny_model, cifar_dir, study="t7", n_trials=1)
    options.sweep = SweepOptions(model_path=tiny_model, data_dir=cifar_dir, adaround_iterations=ADAROUND_ITERATIONS,
                                 registered_onnx_model="resnet8-int8-onnx")
    assert run_tune(options).finished_parent


def test_diagnose_quantizes_a_tune_trial_again_from_its_own_calibration_set(tracking_store, cifar_dir, tiny_model):
    """Trials of one study calibrate on sets of different sizes: each trial's run holds its own calibration indices
    (and AdaRound's), so `ptqflow diagnose` takes a trial's run id or the version tune registered from it."""
    from ptqflow.pipelines.repair.diagnose import DiagnoseOptions, diagnose
    from ptqflow.tracking.keys import Artifact

    first = run_tune(_options(tiny_model, cifar_dir, study="t8", n_trials=1, target_agreement=0.9))
    [version] = first.registered
    study = optuna.load_study(study_name="t8", storage=f"sqlite:///{tracking_store / 'optuna.db'}")
    small = next(p for p in sweep_defaults(50) if p["format"] == "ort-qdq-u8s8")  # AdaRound on the default size
    study.enqueue_trial(small)
    run_tune(_options(tiny_model, cifar_dir, study="t8", n_trials=4, target_agreement=0.9))  # 2 defaults, then it
    trial = next(r for r in _trial_runs("t8") if r.data.params["tune.calibration_size"] == "50")
    client = MlflowClient()
    recorded = json.loads(Path(client.download_artifacts(trial.info.run_id, Artifact.CALIBRATION_INDICES,
                                                         str(tracking_store))).read_text())
    assert len(recorded["indices"]) == 50 and len(recorded["adaround_indices"]) == 100
    for ref in (trial.info.run_id, f"{version.name}/{version.version}"):
        result = diagnose(DiagnoseOptions(ref=ref, output_dir=tracking_store / "diagnosis", images=20))
        [diagnosed] = result.variants
        assert diagnosed.diagnosis.layers and "logged model" in " ".join(diagnosed.diagnosis.notes)
