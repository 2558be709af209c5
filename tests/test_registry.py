"""The champion alias and its gate, promote/models/compare commands, pull by alias."""

from __future__ import annotations

import pytest
from conftest import CALIBRATION_SIZE, version_reason
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ptqflow.pipelines.cli.app import app
from ptqflow.pipelines.registry.gate import Candidate, GatePolicy, decide
from ptqflow.tracking.keys import VersionTag

POLICY = GatePolicy(max_accuracy_drop_pp=0.5, min_agreement=0.97)
SAME_JOB = ((VersionTag.FP32_MODEL_SHA256, "a" * 64), (VersionTag.DATASET_DIGEST, "d" * 64),
            (VersionTag.TEST_IMAGES, "10000"), (VersionTag.INPUT_LAYOUT, "NHWC"), (VersionTag.PREPROCESSING, "raw"))


TIMED_ALIKE = ((VersionTag.LATENCY_CONTENDED, "no"), (VersionTag.CPU_MODEL, "Intel Xeon"),
               (VersionTag.CPU_INT8_ISA, "avx2,avx512_vnni"), (VersionTag.BENCH_THREADS, "2"))


def C(version, delta, agreement, latency=None, sha256=None, input_key=None, **timing) -> Candidate:
    """A version measured on the same job as the others in the table, timed alike unless `timing` (version tag
    name → value, None to leave it out) says otherwise."""
    timed_on = {**dict(TIMED_ALIKE), **{getattr(VersionTag, k.upper()): v for k, v in timing.items()}}
    return Candidate(version, delta, agreement, latency, sha256, input_key, SAME_JOB,
                     tuple((k, v) for k, v in timed_on.items() if v is not None))


@pytest.mark.parametrize("candidate,champion,promote,reason", [
    (C("2", -0.6, 0.99), None, False, "accuracy drop"),
    (C("2", -0.1, 0.96), None, False, "below"),
    (C("2", -0.1, 0.975), None, True, "no champion yet"),
    (C("2", 0.0, 0.98), C("1", 0.0, 0.975), True, "beats champion v1"),
    (C("2", 0.0, 0.975), C("1", 0.0, 0.98), False, "does not beat"),
    (C("2", 0.0, 0.98, 0.10), C("1", 0.0, 0.98, 0.20), True, "faster"),
    (C("2", 0.0, 0.98, 0.30), C("1", 0.0, 0.98, 0.20), False, "does not beat"),
    # A tie needs a clear latency gain (default 25%), not run-to-run noise.
    (C("2", 0.0, 0.98, 0.17), C("1", 0.0, 0.98, 0.20), False, "does not beat"),
    (C("2", 0.0, 0.98, 0.15), C("1", 0.0, 0.98, 0.20), True, "faster"),
    # The same file again (a re-run with the same inputs) never takes the alias, however it timed.
    (C("2", 0.0, 0.99, 0.10, "ab" * 32), C("1", 0.0, 0.98, 0.20, "ab" * 32), False, "same model file"),
    (C("2", 0.0, 0.99, 0.10, "ab" * 32), C("1", 0.0, 0.98, 0.20, "cd" * 32), True, "beats"),
    (C("2", 0.0, 0.99, 0.10, "ab" * 32, "k1"), C("1", 0.0, 0.98, 0.20, "cd" * 32, "k1"), False,
     "same inputs"),
])
def test_gate_decisions(candidate, champion, promote, reason):
    decision = decide(candidate, champion, POLICY)
    assert decision.promote is promote and reason in decision.reason


def test_a_version_slower_than_fp32_at_batch_1_is_promoted_only_when_asked():
    """int8 is made to be faster: a version FP32 outruns at batch 1 does not take @champion by default, and the
    decision says so and how to promote it anyway; its speedup read back from the version's tag."""
    from dataclasses import replace

    slower = replace(C("2", 0.0, 0.99), speedup_b1=0.83, speedup_b1_max=0.91)
    decision = decide(slower, None, POLICY)
    assert not decision.promote and "slower than FP32 at batch 1 in every timing round" in decision.reason
    assert "0.83x" in decision.reason and "--allow-slower" in decision.reason
    assert decide(slower, None, replace(POLICY, allow_slower=True)).promote
    assert decide(replace(slower, speedup_b1=1.4, speedup_b1_max=1.5), None, POLICY).promote
    # a median below 1 that some round finds faster is noise, not a slower model
    assert decide(replace(slower, speedup_b1=0.98, speedup_b1_max=1.06), None, POLICY).promote
    assert not decide(replace(slower, speedup_b1_max=None), None, POLICY).promote  # only the median recorded
    assert decide(C("2", 0.0, 0.99), None, POLICY).promote  # not timed: nothing to hold against it
    tags = {VersionTag.ACCURACY_DELTA_PP: "+0.00", VersionTag.TOP1_AGREEMENT: "0.99",
            VersionTag.SPEEDUP_B1: "0.830", VersionTag.SPEEDUP_B1_MAX: "0.910"}
    assert (Candidate.from_tags("2", tags).speedup_b1, Candidate.from_tags("2", tags).speedup_b1_max) == (0.83, 0.91)


@pytest.mark.parametrize("candidate_timing,champion_timing,reason", [
    ({"latency_contended": "yes"}, {}, "v2 was timed on a busy machine"),
    ({}, {"latency_contended": "yes"}, "v1 was timed on a busy machine"),
    ({"cpu_model": "AMD EPYC"}, {}, "CPU AMD EPYC vs Intel Xeon"),
    ({"cpu_int8_isa": "avx2"}, {}, "int8 instructions avx2 vs avx2,avx512_vnni"),
    ({"bench_threads": "1"}, {}, "threads 1 vs 2"),
    ({}, {"cpu_model": None, "latency_contended": None}, "CPU not recorded"),  # a champion from before the tags
])
def test_a_latency_breaks_a_tie_only_against_a_timing_that_compares(candidate_timing, champion_timing, reason):
    """Twice as fast on a tie, but timed on a busy machine, another CPU, other int8 instructions or threads, or
    against a champion that does not say how it was timed: the alias stays."""
    candidate, champion = C("2", 0.0, 0.98, 0.10, **candidate_timing), C("1", 0.0, 0.98, 0.20, **champion_timing)
    decision = decide(candidate, champion, POLICY)
    assert not decision.promote and "latencies not comparable" in decision.reason and reason in decision.reason
    assert decide(C("2", 0.0, 0.98, 0.10), C("1", 0.0, 0.98, 0.20), POLICY).promote  # timed alike: it is faster


def test_versions_record_how_their_latency_was_timed(tracking_store, tiny_model, cifar_dir):
    """A timed version's tags say whether the machine was busy and on which CPU, int8 instructions and threads: what
    the gate's latency tie-break compares."""
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep
    from ptqflow.tracking.keys import Metric, Param, Tag

    result = run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                                    variants=("ort-int8",), diagnose=False, weight_rounding="nearest"))
    version, = result.registered
    tags = MlflowClient().get_model_version(version.name, version.version).tags
    run = MlflowClient().get_run(next(o.run_id for o in result.outcomes if o.name == "ort-int8"))
    assert tags[VersionTag.CPU_MODEL] == run.data.tags[Tag.CPU_MODEL]
    assert tags[VersionTag.CPU_INT8_ISA] == run.data.tags[Tag.CPU_INT8_ISA]
    assert tags[VersionTag.BENCH_THREADS] == run.data.params[Param.BENCH_THREADS]
    assert tags[VersionTag.LATENCY_CONTENDED] == ("yes" if run.data.metrics[Metric.BENCH_CONTENDED] else "no")


def _sweep(tiny_model, cifar_dir, gate: GatePolicy):
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep

    return run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                                  variants=("pytorch-fx-int8", "ort-uint8"), bench=False, gate=gate,
                                  weight_rounding="nearest"))


def test_champion_moves_only_through_the_gate_and_by_hand(tracking_store, tiny_model, cifar_dir):
    client = MlflowClient()
    _sweep(tiny_model, cifar_dir, GatePolicy(max_accuracy_drop_pp=100, min_agreement=0.0, allow_slower=True))
    assert str(client.get_model_version_by_alias("resnet8-int8", "champion").version) == "1"
    v1 = client.get_model_version("resnet8-int8", "1").tags
    assert v1[VersionTag.PROMOTION_DECISION] == "promoted" and "no champion yet" in version_reason("resnet8-int8", "1")
    # A gate nothing can pass: version 2 is registered but the alias stays on version 1.
    _sweep(tiny_model, cifar_dir, GatePolicy(max_accuracy_drop_pp=-100, min_agreement=0.0))
    assert str(client.get_model_version_by_alias("resnet8-int8", "champion").version) == "1"
    v2 = client.get_model_version("resnet8-int8", "2").tags
    assert v2[VersionTag.PROMOTION_DECISION] == "rejected" and "accuracy drop" in version_reason("resnet8-int8", "2")
    # The policy is in the description's decision sentence (no promotion_policy tag any more).
    description = client.get_model_version("resnet8-int8", "2").description
    assert description.startswith("Rejected: accuracy drop") and "agreement >=" in description.split("\n\n")[0]

    runner = CliRunner()
    listed = runner.invoke(app, ["models"])
    assert listed.exit_code == 0, listed.output
    assert "resnet8-int8" in listed.stdout and "@champion" in listed.stdout and "rejected" in listed.stdout

    promoted = runner.invoke(app, ["promote", "resnet8-int8", "2", "--alias", "champion"])
    assert promoted.exit_code == 0, promoted.output
    assert str(client.get_model_version_by_alias("resnet8-int8", "champion").version) == "2"
    assert client.get_model_version("resnet8-int8", "2").tags[VersionTag.PROMOTION_DECISION] == "manual"

    missing = runner.invoke(app, ["promote", "resnet8-int8", "9"])
    assert missing.exit_code != 0 and "no version 9" in missing.stderr


def test_pull_by_alias_and_compare_two_sweeps(tracking_store, tiny_model, cifar_dir, tmp_path):
    first = _sweep(tiny_model, cifar_dir, GatePolicy(max_accuracy_drop_pp=100, min_agreement=0.0))
    second = _sweep(tiny_model, cifar_dir, GatePolicy(max_accuracy_drop_pp=100, min_agreement=0.0))
    client = MlflowClient()
    v1, v2 = (client.get_model_version("resnet8-int8", v) for v in ("1", "2"))
    # Same inputs: the re-run is registered but does not take the alias (TorchScript files carry a random
    # serialization id, so their bytes differ; the input key does not).
    assert v2.tags[VersionTag.INPUT_KEY] == v1.tags[VersionTag.INPUT_KEY]
    assert v2.tags[VersionTag.PROMOTION_DECISION] == "rejected"
    assert "same inputs as champion v1" in version_reason("resnet8-int8", "2")
    assert str(client.get_model_version_by_alias("resnet8-int8", "champion").version) == "1"
    runner = CliRunner()
    pulled = runner.invoke(app, ["pull", "resnet8-int8@champion", "--output", str(tmp_path), "--evaluate",
                                 "--data-dir", str(cifar_dir)])
    assert pulled.exit_code == 0, pulled.output
    assert "verified" in pulled.stdout and "matches the registered" in pulled.stdout

    compared = runner.invoke(app, ["compare", first.parent_run_id, second.parent_run_id])
    assert compared.exit_code == 0, compared.output
    assert "pytorch-fx-int8" in compared.stdout and "ort-uint8" in compared.stdout and "Δ" in compared.stdout
    versions = runner.invoke(app, ["compare", "resnet8-int8/1", "resnet8-int8/2"])
    assert versions.exit_code == 0, versions.output
    assert "resnet8-int8 v1" in versions.stdout and "resnet8-int8 v2" in versions.stdout


@pytest.mark.parametrize("test_images", [1, 3, 7, 30, 99, 100, 101, 300, 333, 500, 999, 1000, 1001, 2500, 9999, 10000])
def test_pull_compares_what_the_recorded_accuracy_cannot_hide(test_images):
    """The version's accuracy tag is rounded to the test set's resolution: a faithful re-evaluation (the same number
    of correct images) matches it for every size, and one image more or fewer never does."""
    from ptqflow.pipelines.registry.pull import accuracy_matches
    from ptqflow.pipelines.shared.precision import share_decimals

    decimals = share_decimals(test_images)
    for correct in sorted({0, 1, test_images // 3, (2 * test_images) // 3, test_images - 1, test_images}):
        recorded = f"{correct / test_images:.{decimals}f}"  # as the registrar writes it
        assert accuracy_matches(correct / test_images, recorded, test_images)
        for other in (correct - 1, correct + 1):
            if 0 <= other <= test_images:
                assert not accuracy_matches(other / test_images, recorded, test_images), (other, recorded)


def test_pull_evaluate_passes_on_a_test_set_whose_shares_round(tracking_store, tiny_model, cifar_dir, tmp_path):
    """30 test images, one relabelled so that not all are right: the accuracy is k/30, recorded with 2 decimals
    (29/30 as 0.97); `pull --evaluate` of the faithful version passes."""
    from cifar_fixture import write_npz

    from ptqflow.pipelines.data.datasets import load_dataset
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep

    data = load_dataset(cifar_dir)
    labels = data.test.labels.copy()
    labels[0] = (labels[0] + 1) % 10
    npz = write_npz(tmp_path / "data" / "relabelled.npz", (data.train.images, data.train.labels),
                    (data.test.images, labels), data.class_names)
    run_sweep(SweepOptions(model_path=tiny_model, data_dir=npz, calibration_size=CALIBRATION_SIZE,
                           variants=("ort-int8",), bench=False, diagnose=False, weight_rounding="nearest",
                           test_limit=30))
    tags = MlflowClient().get_model_version("resnet8-int8-onnx", "1").tags
    accuracy = float(tags[VersionTag.ACCURACY])
    assert tags[VersionTag.TEST_IMAGES] == "30" and len(tags[VersionTag.ACCURACY].split(".")[1]) == 2
    assert abs(round(accuracy * 30) / 30 - accuracy) > 1e-4  # rounded: what a fixed 1e-4 tolerance refused
    pulled = CliRunner().invoke(app, ["pull", "resnet8-int8-onnx/1", "--output", str(tmp_path / "pulled"),
                                      "--evaluate", "--data-dir", str(npz)])
    assert pulled.exit_code == 0, pulled.output
    assert "matches the registered" in pulled.stdout


def test_a_description_written_by_hand_survives_the_next_sweep(tracking_store, tiny_model, cifar_dir):
    """ptqflow writes a registered model's description only when it creates the model; a person's edit stays."""
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep

    def sweep():
        return run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                                      variants=("ort-int8",), bench=False, diagnose=False,
                                      weight_rounding="nearest"))

    client = MlflowClient()
    sweep()
    assert "ONNX int8 quantizations of resnet8.onnx" in client.get_registered_model("resnet8-int8-onnx").description
    client.update_registered_model("resnet8-int8-onnx", description="Owned by the vision team; ask before use.")
    sweep()
    assert client.get_model_version("resnet8-int8-onnx", "2") is not None
    assert client.get_registered_model("resnet8-int8-onnx").description == "Owned by the vision team; ask before use."


def test_mixed_variants_register_under_their_own_names_with_their_int8_mac_share(tracking_store, cifar_dir, tmp_path):
    """A `-mixed` variant (layers upgraded to FP32 or 16 bits) never becomes a version of `<stem>-int8-onnx`, even when
    it agrees more often with FP32 than the fully quantized one: it goes to `<stem>-mixed-onnx`. Every variant run
    and version records the share of MACs that runs in int8, the comparison table shows it, and the sweep's
    experiment is named after the model."""
    import csv
    import io

    import onnx
    from onnx_fixture import outlier_cnn

    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep
    from ptqflow.tracking import records
    from ptqflow.tracking.keys import Artifact, Param

    model = tmp_path / "outlier.onnx"
    onnx.save(outlier_cnn(outlier=True), str(model))
    result = run_sweep(SweepOptions(model_path=model, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                                    variants=("ort-int8",), bench=False, diagnose=False, weight_rounding="nearest",
                                    target_agreement=0.999, ranking_images=50, equalization="off"))
    by_name = {o.name: o for o in result.outcomes}
    assert by_name["ort-int8-mixed"].fidelity.top1_agreement > by_name["ort-int8"].fidelity.top1_agreement
    client = MlflowClient()
    int8, mixed = (client.get_model_version(name, "1") for name in ("outlier-int8-onnx", "outlier-mixed-onnx"))
    assert int8.tags[VersionTag.VARIANT] == "ort-int8" and mixed.tags[VersionTag.VARIANT] == "ort-int8-mixed"
    assert [str(v.version) for v in client.search_model_versions("name = 'outlier-int8-onnx'")] == ["1"]
    assert "mixed-precision" in client.get_registered_model("outlier-mixed-onnx").description
    shares = {name: client.get_run(o.run_id).data.params[Param.INT8_MAC_SHARE] for name, o in by_name.items()}
    assert float(shares["fp32"]) == 0.0
    assert 0 <= float(shares["ort-int8-mixed"]) < float(shares["ort-int8"]) <= 1  # upgraded layers left int8
    assert int8.tags[VersionTag.INT8_MAC_SHARE] == shares["ort-int8"]
    assert mixed.tags[VersionTag.INT8_MAC_SHARE] == shares["ort-int8-mixed"]
    assert "of its MACs in int8" in mixed.description
    rows = {r["variant"]: r for r in csv.DictReader(io.StringIO(
        records.download_text(result.parent_run_id, Artifact.COMPARISON_CSV)))}
    assert {name: float(rows[name]["int8_mac_share"]) for name in shares} == {k: float(v) for k, v in shares.items()}
    assert "int8 MACs %" in records.download_text(result.parent_run_id, Artifact.COMPARISON_MD)
    parent = client.get_run(result.parent_run_id)
    assert client.get_experiment(parent.info.experiment_id).name == "outlier-quantization"


def test_default_experiment_and_registered_names_follow_the_model_file(tracking_store, tiny_model, cifar_dir, tmp_path):
    """`<stem>-quantization` (the old `resnet8-quantization` for resnet8.onnx) from the CLI, the API and tune alike;
    `--experiment` still overrides. -mixed variants have names of their own, also after a name the user chose."""
    import shutil
    from pathlib import Path

    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.tune.options import TuneOptions
    from ptqflow.pipelines.variants.specs import ONNXRUNTIME, PYTORCH

    other = SweepOptions(model_path=Path("models/mnv3_cifar.onnx"))
    assert other.experiment == "mnv3_cifar-quantization"
    assert SweepOptions(model_path=Path("data/models/resnet8.onnx")).experiment == "resnet8-quantization"
    assert SweepOptions(model_path=Path("m.onnx"), experiment="team").experiment == "team"
    assert TuneOptions(sweep=other).sweep.experiment == "mnv3_cifar-quantization"
    assert other.registered_names() == {
        (PYTORCH, False): ("mnv3_cifar-int8", False), (PYTORCH, True): ("mnv3_cifar-mixed", False),
        (ONNXRUNTIME, False): ("mnv3_cifar-int8-onnx", False), (ONNXRUNTIME, True): ("mnv3_cifar-mixed-onnx", False)}
    chosen = SweepOptions(model_path=Path("m.onnx"), registered_model="team-fx", registered_onnx_model="team-ort")
    assert chosen.registered_names() == {
        (PYTORCH, False): ("team-fx", True), (PYTORCH, True): ("team-fx-mixed", True),
        (ONNXRUNTIME, False): ("team-ort", True), (ONNXRUNTIME, True): ("team-ort-mixed", True)}

    model = tmp_path / "mnv3_cifar.onnx"
    shutil.copy(tiny_model, model)
    swept = CliRunner().invoke(app, ["sweep", "--model", str(model), "--data-dir", str(cifar_dir), "--variant",
                                     "ort-int8", "--calibration-size", str(CALIBRATION_SIZE), "--no-bench",
                                     "--no-diagnose", "--weight-rounding", "nearest", "--no-register"])
    assert swept.exit_code == 0, swept.output
    names = {e.name for e in MlflowClient().search_experiments()}
    assert "mnv3_cifar-quantization" in names and "resnet8-quantization" not in names


def test_int8_mac_share_counts_what_the_recipe_leaves_out_of_8_bits():
    """The float head, layers kept in FP32 and layers reading a 16-bit activation are not int8 MACs; the share is
    truncated, so a model with any of them never reads 1."""
    from dataclasses import replace

    from onnx_fixture import tiny_cnn

    from ptqflow.models.backends.mac_share import MacTable
    from ptqflow.models.graph.layer_map import layer_table
    from ptqflow.models.graph.rewrites import name_unnamed_nodes
    from ptqflow.pipelines.variants.specs import VARIANTS

    model = name_unnamed_nodes(tiny_cnn())  # as the sweep names the model it quantizes
    table = MacTable(model)
    layers = [layer for layer in layer_table(model) if layer.macs]
    total = sum(layer.macs for layer in layers)
    # the speed check's layers are tests/test_speed_check.py's: here every convolution the recipe quantizes counts
    ort = replace(VARIANTS["ort-int8"].config, speed_check=False)
    fx = VARIANTS["pytorch-fx-int8"].config
    head = sum(layer.macs for layer in layers if layer.name in table.head)
    assert 0 < head and table.share(ort) == table.share(fx) < 1
    assert table.share(replace(ort, float_head=False)) == 1.0
    first = layers[0]
    assert table.share(replace(ort, float_head=False, fp32_nodes=(first.name,))) == \
        int(10_000 * (total - first.macs) / total) / 10_000
    reader = next(layer for layer in layers if layer.input == first.output)
    assert table.share(replace(ort, float_head=False, activation_16bit_tensors=(first.output,))) == \
        int(10_000 * (total - reader.macs) / total) / 10_000
    everything = tuple(layer.name for layer in layers)
    assert table.share(replace(fx, fp32_modules=everything)) == 0.0


def test_a_default_mixed_name_holding_another_model_is_refused_only_when_the_fallback_runs(tracking_store, tmp_path):
    """`<stem>-mixed-onnx` is a default name like `<stem>-int8-onnx`: it never mixes FP32 models. It is checked when
    the sweep has a fallback target (only then does it make -mixed variants)."""
    from pathlib import Path

    import mlflow

    from ptqflow.common.errors import ConfigError
    from ptqflow.pipelines.registry.registrar import check_registry_targets
    from ptqflow.pipelines.sweep.options import SweepOptions

    (tmp_path / "model.txt").write_text("another model's version")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "model.txt"), "x")
    client = MlflowClient()
    client.create_registered_model("outlier-mixed-onnx")
    client.create_model_version("outlier-mixed-onnx", f"{run.info.artifact_uri}/x", run.info.run_id,
                                tags={VersionTag.FP32_MODEL_SHA256: "f" * 64})
    options = SweepOptions(model_path=Path("outlier.onnx"), variants=("ort-int8",))
    check_registry_targets(options.registered_names(), options.specs(), "a" * 64)  # no target: no -mixed variant
    with pytest.raises(ConfigError, match="registered model 'outlier-mixed-onnx' holds versions of another FP32"):
        check_registry_targets(options.registered_names(), options.specs(), "a" * 64, fallback=True)


@pytest.mark.parametrize("message,race", [
    ('BAD_REQUEST: (psycopg.errors.UniqueViolation) duplicate key value violates unique constraint '
     '"registered_model_alias_pk"', True),  # what a CI run's second sweep got from PostgreSQL
    ("(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases.name", True),
    ("PERMISSION_DENIED: Permission denied", False),
    ("RESOURCE_DOES_NOT_EXIST: Registered Model with name=x not found", False),
])
def test_a_second_insert_of_the_same_alias_is_told_from_other_failures(message, race):
    from mlflow.exceptions import MlflowException

    from ptqflow.tracking.aliases import is_concurrent_write

    assert is_concurrent_write(MlflowException(message)) is race


@pytest.mark.parametrize("other_sweeps_version,promoted", [
    (C("1", 0.0, 0.99), False),  # the sweep that won the race registered a better version: this one is rejected
    (C("1", 0.0, 0.975), True),  # a worse one: this one takes the alias from it
])
def test_two_sweeps_promoting_at_once_end_as_if_one_came_after_the_other(other_sweeps_version, promoted):
    """Both sweeps read "no champion" and promote; the store refuses the second insert of the alias (AliasRace).
    The loser reads the champion again and is decided against it."""
    from ptqflow.pipelines.registry.registrar import promote_through_races
    from ptqflow.tracking.aliases import AliasRace

    set_calls = []

    def set_champion():
        set_calls.append(len(set_calls))
        if len(set_calls) == 1:
            raise AliasRace("cannot point alias 'champion' of m at version 2: duplicate key value")

    decision = promote_through_races(C("2", 0.0, 0.98), None, POLICY, set_champion, lambda: other_sweeps_version)
    assert decision.promote is promoted
    assert len(set_calls) == (2 if promoted else 1)
    assert ("v1" in decision.reason) and ("no champion yet" not in decision.reason)


def test_an_alias_that_keeps_racing_fails_with_one_line():
    from ptqflow.pipelines.registry.registrar import ALIAS_RACE_ATTEMPTS, promote_through_races
    from ptqflow.tracking.aliases import AliasRace

    calls = []

    def set_champion():
        calls.append(1)
        raise AliasRace("cannot point alias 'champion' of m at version 2: duplicate key value")

    with pytest.raises(AliasRace, match="cannot point alias"):
        promote_through_races(C("2", 0.0, 0.98), None, POLICY, set_champion, lambda: None)
    assert len(calls) == ALIAS_RACE_ATTEMPTS
