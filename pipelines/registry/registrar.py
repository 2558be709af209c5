"""The registry side of a sweep: register each framework's best fully quantized int8 variant, and apart from it its
best `-mixed` one, as new versions (tags, description), let the promotion gate decide whether each takes @champion,
and read the champions back for the report.

The versions are made from the variant runs the sweep logged (ptqflow.pipelines.sweep.sweep); the gate's rules are
ptqflow.pipelines.registry.gate, the registry calls ptqflow.tracking.registry and ptqflow.tracking.aliases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ptqflow.common.errors import ConfigError, PtqflowError
from ptqflow.pipelines.reports import comparison as report
from ptqflow.pipelines.shared.precision import round_metric, share_decimals
from ptqflow.pipelines.shared.progress import say
from ptqflow.pipelines.registry.gate import CHAMPION_ALIAS, Candidate, GatePolicy, decide
from ptqflow.pipelines.variants.specs import FP32, PYTORCH, VariantSpec
from ptqflow.tracking import records
from ptqflow.tracking import runs
from ptqflow.tracking.keys import Artifact, Metric, Param, Tag, VersionTag

# (framework, mixed) → (registered model name, whether the user chose it); see SweepOptions.registered_names.
# `mixed` False: the fully quantized variants (`<stem>-int8`, `<stem>-int8-onnx`); True: the `-mixed` variants the
# fallback made, some layers in FP32 or 16 bits (`<stem>-mixed`, `<stem>-mixed-onnx`).
RegisteredNames = dict[tuple[str, bool], tuple[str, bool]]


@dataclass(frozen=True)
class MeasuredOn:
    """The sweep's FP32 model and test set: what every registered number was measured on."""

    model_file_name: str
    model_sha256: str
    dataset_digest: str
    test_images: int
    input_layout: str
    preprocessing: str
    input_batch: int | None  # the model's fixed batch dimension, None when dynamic
    data_title: str = "CIFAR-10"  # e.g. CIFAR-100, or the image folder's name
    input_size_text: str = "32x32x3"  # HxWxC of the model's input
    input_tags: tuple[tuple[str, str], ...] = ()  # data format, resizing, mean/std where not the default

    @classmethod
    def of(cls, inputs) -> "MeasuredOn":
        """From ptqflow.pipelines.sweep.inputs.SweepInputs."""
        from ptqflow.pipelines.data import shapes

        shape = inputs.shape
        input_tags = shapes.input_version_tags(inputs.data, shape, inputs.transform) if shape else {}
        return cls(inputs.model.path.name, inputs.model.sha256, inputs.data.digest, len(inputs.test),
                   inputs.transform.layout, inputs.transform.preprocessing.value, inputs.model.input.batch_size,
                   inputs.data.title, f"{shape.size[0]}x{shape.size[1]}x{shape.channels}" if shape else "?",
                   tuple(input_tags.items()))

    def version_tags(self) -> dict[str, str]:
        """What this sweep's numbers were measured on; the gate compares only versions that agree on all of it."""
        V = VersionTag
        return {V.FP32_MODEL_SHA256: self.model_sha256, V.DATASET_DIGEST: self.dataset_digest,
                V.TEST_IMAGES: str(self.test_images), V.INPUT_LAYOUT: self.input_layout,
                V.PREPROCESSING: self.preprocessing, **dict(self.input_tags)}


def check_registry_targets(names: RegisteredNames, specs: list[VariantSpec], model_sha256: str,
                           fallback: bool = False) -> None:
    """Refuse, before any run starts, to add versions to a default-named registered model whose versions were
    quantized from another FP32 model: a name the user did not choose must not mix models. The `-mixed` names are
    checked only with `fallback` (a target that makes `-mixed` variants)."""
    from ptqflow.tracking.registry import source_model_digests

    frameworks = {spec.framework for spec in specs}
    for (framework, mixed), (name, explicit) in names.items():
        if explicit or framework not in frameworks or (mixed and not fallback):
            continue
        others = source_model_digests(name) - {model_sha256}
        if others:
            flag = "--registered-model" if framework == PYTORCH else "--registered-onnx-model"
            raise ConfigError(f"registered model '{name}' holds versions of another FP32 model (SHA-256 "
                              f"{sorted(others)[0][:12]}…, this one is {model_sha256[:12]}…); pass {flag} NAME to "
                              "choose where this model's versions go")


def timing_tags(run_id: str) -> dict[str, str]:
    """What the source run's latency was measured on, as version tags: whether the machine was busy, the CPU, its
    int8 instructions and the threads. Read from the run that was timed (a reused run was timed by another sweep,
    maybe on another machine), so the gate can tell timings that compare from those that do not."""
    V = VersionTag
    run = runs.get_run(run_id)
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    found = {V.CPU_MODEL: tags.get(Tag.CPU_MODEL), V.CPU_INT8_ISA: tags.get(Tag.CPU_INT8_ISA),
             V.BENCH_THREADS: params.get(Param.BENCH_THREADS), V.LATENCY_THREADS: params.get(Param.LATENCY_THREADS)}
    if Metric.BENCH_CONTENDED in metrics:
        found[V.LATENCY_CONTENDED] = "yes" if metrics[Metric.BENCH_CONTENDED] else "no"
    return {key: value for key, value in found.items() if value}


def current_champion(name: str) -> Candidate | None:
    """The current champion as the registry records it, or None; a read error raises (never "no champion")."""
    from ptqflow.tracking import aliases

    current = aliases.alias_target(name, CHAMPION_ALIAS)
    return Candidate.from_tags(str(current.version), current.tags) if current is not None else None


ALIAS_RACE_ATTEMPTS = 3  # decisions against a champion another sweep moved meanwhile, before giving up


def promote_through_races(candidate: Candidate, champion: Candidate | None, gate: GatePolicy,
                          set_champion: Callable[[], None], read_champion: Callable[[], Candidate | None]):
    """The gate's decision for `candidate` against `champion`, the alias moved when it promotes. When another
    sweep moves the alias at the same moment (AliasRace), the champion is read again and the candidate decided
    against that one: two sweeps that finish together end as if they had finished one after the other."""
    from ptqflow.tracking.aliases import AliasRace

    races = 0
    while True:
        decision = decide(candidate, champion, gate)
        if not decision.promote:
            return decision
        try:
            set_champion()
            return decision
        except AliasRace:
            races += 1
            if races == ALIAS_RACE_ATTEMPTS:
                raise
            champion = read_champion()


class Registrar:
    """Registers a sweep's best int8 variants under `names` and gates them with `gate`."""

    def __init__(self, names: RegisteredNames, gate: GatePolicy, measured_on: MeasuredOn,
                 mac_share: Callable[[VariantSpec], float | None] = lambda spec: None):
        self.names = names
        self.gate = gate
        self.measured_on = measured_on
        self.mac_share = mac_share  # the share of MACs a spec runs in int8 (RunRecorder.int8_mac_share)

    def register_best(self, outcomes: list, reference_accuracy: float) -> list:
        """Per framework, the ok int8 variant that agrees most often with FP32 (accuracy breaks ties) becomes a new
        version: a fully quantized one under the int8 name, a `-mixed` one under the mixed name, never the one
        under the other's. Returns the registered ModelVersions. `outcomes` are
        ptqflow.pipelines.sweep.outcomes.VariantOutcome."""
        from ptqflow.tracking import registry

        registered = []
        for (framework, mixed), (name, _) in sorted(self.names.items(), key=lambda item: item[0][1]):
            candidates = [o for o in outcomes if o.framework == framework and o.status == "ok" and o.name != FP32
                          and o.spec is not None and o.spec.weight_dtype == "int8"
                          and o.spec.keeps_layers_out_of_8_bits == mixed]
            if not candidates:
                continue
            # Agreement with FP32 is the sharper measure on 10,000 images; accuracy breaks ties.
            best = max(candidates, key=lambda o: (o.fidelity.top1_agreement, o.evaluation.accuracy))
            tags = self._version_tags(best, reference_accuracy)
            description, model_description = self._descriptions(best, framework, reference_accuracy,
                                                                tags.get(VersionTag.INT8_MAC_SHARE))
            champion = current_champion(name)  # read before registering: a failed read leaves no undecided version
            # From the variant's MLflow logged model (a run reused from before logged models: its model/ dir).
            source = best.model_uri or f"runs:/{best.run_id}/{Artifact.LOGGED_MODEL_NAME}"
            version = registry.register(source, name, tags, description, model_description)
            records.set_run_tags(best.run_id, {Tag.REGISTERED_VERSION: f"{name}/{version.version}"})
            say(f"[green]✓[/] registered {best.name} as [bold]{name}[/] version {version.version}")
            self._gate(name, version.version, tags, champion)
            registered.append(version)
        return registered

    def _version_tags(self, best, reference_accuracy: float) -> dict[str, str]:
        """Few, short tags: what `pull`, `serve`, `bench`, the gate and `ptqflow models` read. The source run is the
        version's own run_id (MLflow sets it from the logged model), and the decision's reason is the first sentence
        of the description, where the registry page shows it whole. Numbers at the precision their metrics have."""
        V = VersionTag
        decimals = share_decimals(self.measured_on.test_images)
        tags = {V.VARIANT: best.name, V.ACCURACY: f"{best.evaluation.accuracy:.{decimals}f}",
                V.ACCURACY_DELTA_PP: f"{100 * (best.evaluation.accuracy - reference_accuracy):+.{max(2, decimals - 2)}f}",
                V.TOP1_AGREEMENT: f"{best.fidelity.top1_agreement:.{decimals}f}",
                V.SHA256: best.model_sha256, V.MODEL_FILE: best.model_file_in_artifacts,
                **self.measured_on.version_tags()}
        if best.input_key:
            tags[V.INPUT_KEY] = best.input_key
        if best.quantized_engine:
            tags[V.QUANTIZED_ENGINE] = best.quantized_engine
        if self.measured_on.input_batch:
            tags[V.INPUT_BATCH] = str(self.measured_on.input_batch)
        if best.bench:
            tags[V.LATENCY_MS_B1] = f"{round_metric(Metric.LATENCY_MS_B1_P50, best.bench.latency_ms_b1_p50):.3f}"
            if best.bench.speedup_b1 is not None:
                tags[V.SPEEDUP_B1] = f"{round_metric(Metric.SPEEDUP_VS_FP32_B1, best.bench.speedup_b1):.3f}"
            if best.bench.speedup_b1_range is not None:
                largest = best.bench.speedup_b1_range[1]
                tags[V.SPEEDUP_B1_MAX] = f"{round_metric(Metric.SPEEDUP_VS_FP32_B1_MAX, largest):.3f}"
            tags.update(timing_tags(best.run_id))
        share = best.int8_mac_share if getattr(best, "int8_mac_share", None) is not None else self.mac_share(best.spec)
        if share is not None:
            tags[V.INT8_MAC_SHARE] = str(share)  # as the run param reads
        return tags

    def _descriptions(self, best, framework: str, reference_accuracy: float,
                      mac_share: str | None = None) -> tuple[str, str]:
        """The version's description (the gate's decision is put in front of it once it is made, by
        ptqflow.tracking.aliases.record_decision) and the registered model's (written only when the registered
        model is created: a description someone edits later stays)."""
        m = self.measured_on
        latency = f", batch-1 latency {best.bench.latency_ms_b1_p50:.3f} ms" if best.bench else ""
        macs = f", {100 * float(mac_share):.2f}% of its MACs in int8" if mac_share is not None else ""
        description = (f"{best.name}: {m.model_file_name} quantized by ptqflow. Top-1 accuracy "
                       f"{100 * best.evaluation.accuracy:.2f}% on {m.test_images} {m.data_title} test images "
                       f"({100 * (best.evaluation.accuracy - reference_accuracy):+.2f} pp vs FP32), "
                       f"agreement with FP32 {100 * best.fidelity.top1_agreement:.2f}%{latency}{macs}. "
                       f"Source run {best.run_id}, logged model {best.model_uri}.")
        kind = ("mixed-precision quantizations (int8, with the layers the sensitivity-ranked fallback chose in "
                "FP32 or 16 bits)" if best.spec.mixed is not None else "int8 quantizations")
        model_description = (
            f"{'TorchScript' if framework == PYTORCH else 'ONNX'} {kind} of "
            f"{m.model_file_name} ({m.data_title} classifier, {m.input_layout} {m.input_size_text}, "
            f"{m.preprocessing} pixels), one version per ptqflow sweep: the variant "
            "that agrees most often with the FP32 model's top-1. Alias @champion marks the version that passed "
            "the promotion gate and beat the previous champion; each version's description says what the gate "
            "decided and why, its tags hold the numbers `ptqflow pull` and the gate read.")
        return description, model_description

    def _gate(self, name: str, version: str, tags: dict[str, str], champion: Candidate | None) -> None:
        """Move the champion alias to the new version only if it passes the gate and beats the champion, both
        read as the registry records them."""
        from ptqflow.tracking import aliases

        decision = promote_through_races(Candidate.from_tags(version, tags), champion, self.gate,
                                         lambda: aliases.set_alias(name, CHAMPION_ALIAS, version),
                                         lambda: current_champion(name))
        aliases.record_decision(name, version, "promoted" if decision.promote else "rejected", decision.reason,
                                self.gate.describe(), alias=CHAMPION_ALIAS)
        mark = "[green]✓[/]" if decision.promote else "[yellow]–[/]"
        say(f"{mark} {name} v{version} {'is now' if decision.promote else 'not'} @{CHAMPION_ALIAS}: {decision.reason}")

    def champions(self, experiment_id: str,
                  run_url: Callable[[str, str], str]) -> list[tuple[report.Champion, str]]:
        """Each registered model's @champion after this sweep's gate, with a link to the run that made it
        (`run_url(experiment_id, run_id)`). Only marks the report: a read error leaves the mark out, it fails
        nothing."""
        from ptqflow.tracking import aliases

        champions = []
        for name, _ in self.names.values():
            try:
                current = aliases.alias_target(name, CHAMPION_ALIAS)
                if current is None:
                    continue
                experiment = runs.get_run(current.run_id).info.experiment_id if current.run_id else experiment_id
            except PtqflowError as exc:
                say(f"[yellow]![/] comparison.html has no @champion mark for {name}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - a missing mark must not fail a finished sweep
                say(f"[yellow]![/] comparison.html has no @champion mark for {name}: {type(exc).__name__}")
                continue
            champion = report.Champion(name, str(current.version), current.run_id or "")
            champions.append((champion, run_url(experiment, current.run_id) if current.run_id else ""))
        return champions
