"""Sensitivity-ranked fallback: when a variant misses the target (top-1 agreement with FP32, accuracy points lost, or
both), find the few layers whose 8-bit quantization costs it most and take them out of 8 bits until the target holds
on the full test set. The result is a new variant, `<variant>-mixed`, made, measured, logged, diagnosed and
registered like any other.

1. Candidates (`candidates`): the variant's quantized layers from its per-layer diagnosis (ptqflow.models.diagnosis), worst
   local SQNR first: the worst `candidates` (8), any other layer the diagnosis gives a hint, and any without a local
   SQNR. Local SQNR is only this pre-filter: a layer's own noise says little about what it costs at the output.
2. Ranking (`FallbackSearch.rank`): each candidate upgraded alone, quantized and measured on the first
   `ranking_images` test images: its end-to-end effect. The upgrades (ptqflow.pipelines.variants.specs.UPGRADE_KINDS), cheapest
   first: `int16`, its input activation in 16 bits (ONNX Runtime QDQ only); `fp32`, the layer in FP32 (the
   activations around it stay 8-bit: its neighbours quantize them); `fp32+inputs`, the layer and the quantized layers
   feeding it in FP32, so that its input is never quantized (a layer's output is quantized whatever reads it, in both
   backends; NNCF's ranker likewise reverts the quantizers that must change together as one group). Layers are
   ordered by the best logit SQNR any of their upgrades reached (steadier than agreement on a few hundred images),
   then agreement, then local SQNR.
3. Greedy restore (`FallbackSearch.run`): the upgrades join the config one at a time, each measured on all the
   selection images, until the target holds or the candidates run out: first, where the backend has them, every
   layer's 16-bit input in the order its 16-bit upgrade ranked; then FP32 in the order the FP32 upgrades ranked (for each
   layer the better of `fp32` and `fp32+inputs`, replacing its 16-bit upgrade). Every step stays in the config, as
   in NNCF's restore loop: one layer's effect on a few hundred borderline images is as large as the noise of the
   others, and a search that dropped the steps which did not help at once stalled short of the target on ResNet8.
   The config that came closest to the target (`FallbackTarget.shortfall`, then logit SQNR) is the `-mixed` variant,
   whether it reached the target or not (none when no step came closer than the variant itself); one line says
   which. A layer kept in FP32 computes with its FP32 weights, not AdaRound's (ptqflow.models.backends.base.FloatModel.for_config).

The selection images are the held-out training images (`--validation-size`, outside the calibration set), never
the test set: a search that chose its layers on the test images would report a test agreement it was fitted to.
The `-mixed` variant is then made and measured on the test set like any variant, so whether the target holds there
is measured, not assumed. Only with no held-out images (`--validation-size 0`) does it select on the test images,
and it says so (`selected_on`).

Ranking and restoring know nothing of MLflow (NNCF's accuracy control separates them the same way).
`ptqflow.pipelines.repair.sweep_fallback.SweepFallback` is the sweep's side: each step a child run of the variant's
run, the search as `fallback/search.json` and a one-line tag on it. The untracked Python API uses `repair_untracked`.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, ContextManager

from ptqflow.common.errors import ConfigError, TrackingError, failure_reason
from ptqflow.common.interrupts import checkpoint
from ptqflow.models.backends.base import backend_error
from ptqflow.pipelines.shared.progress import progress_task, say
from ptqflow.pipelines.variants.specs import Mixed, Upgrade, VariantSpec, apply_upgrades, upgrade_kinds

DEFAULT_CANDIDATES = 8  # layers ranked, by worst local SQNR (plus any with a hint)
DEFAULT_RANKING_IMAGES = 1000  # the first N selection images rank the candidates
MIXED_SUFFIX = "-mixed"
_EPSILON = 1e-9  # agreement and accuracy are shares of whole images; this is far below one image


@dataclass(frozen=True)
class FallbackTarget:
    """What every int8 variant must reach; both criteria, when both are given."""

    agreement: float | None = None  # least top-1 agreement with FP32, a fraction (--target-agreement 0.995)
    max_drop_pp: float | None = None  # most accuracy points below FP32 (--max-drop 0.3)

    def __post_init__(self):
        if self.agreement is not None:
            if isinstance(self.agreement, bool) or not isinstance(self.agreement, (int, float)) \
                    or not 0 < self.agreement <= 1:
                raise ConfigError(f"--target-agreement is a share of the test images in (0, 1], e.g. 0.995; got "
                                  f"{self.agreement!r}")
        if self.max_drop_pp is not None:
            if isinstance(self.max_drop_pp, bool) or not isinstance(self.max_drop_pp, (int, float)) \
                    or not math.isfinite(self.max_drop_pp) or self.max_drop_pp < 0:
                raise ConfigError(f"--max-drop is in accuracy points, 0 or more, e.g. 0.3; got {self.max_drop_pp!r}")

    @property
    def active(self) -> bool:
        return self.agreement is not None or self.max_drop_pp is not None

    def shortfall(self, accuracy: float, agreement: float, reference_accuracy: float) -> float:
        """How far a measurement is from the target, 0 when it holds: the agreement missing plus the accuracy lost
        beyond the allowed drop, both as shares of the images."""
        missing = 0.0
        if self.agreement is not None:
            missing += max(0.0, self.agreement - agreement)
        if self.max_drop_pp is not None:
            missing += max(0.0, (reference_accuracy - accuracy) - self.max_drop_pp / 100)
        return 0.0 if missing < _EPSILON else missing

    def describe(self) -> str:
        parts = []
        if self.agreement is not None:
            parts.append(f"top-1 agreement >= {100 * self.agreement:g}%")
        if self.max_drop_pp is not None:
            parts.append(f"accuracy drop <= {self.max_drop_pp:g} pp")
        return " and ".join(parts)


def check_options(target: FallbackTarget, diagnose_images: int, ranking_images: int, candidates: int) -> None:
    """The sweep's options for the diagnosis and the search (the target checks itself): ConfigError when bad."""
    for option, value in (("--diagnose-images", diagnose_images), ("--ranking-images", ranking_images),
                          ("--fallback-candidates", candidates)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{option} must be a whole number, at least 1; got {value!r}")


@dataclass(frozen=True)
class Measurement:
    """A config's numbers on some of the selection images, against the labels and the FP32 model on the same
    images."""

    accuracy: float
    agreement: float
    logit_sqnr_db: float
    images: int

    @classmethod
    def of(cls, evaluation, fidelity) -> "Measurement":
        return cls(evaluation.accuracy, fidelity.top1_agreement, fidelity.sqnr_db, len(evaluation.predictions))

    @property
    def score(self) -> tuple[float, float]:
        """Higher is closer to FP32, for ranking: the logits' SQNR, then agreement. Both measure the end-to-end
        effect, but on the ranking images agreement moves by single borderline images (1 in 50 on the test
        fixture, a few in 1,000 on ResNet8 at 98.5%), while the SQNR of every image's logits is steady."""
        return self.logit_sqnr_db, self.agreement

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "agreement": self.agreement, "logit_sqnr_db": _db(self.logit_sqnr_db),
                "images": self.images}


@dataclass(frozen=True)
class Candidate:
    layer: str  # ONNX node name
    op_type: str
    input_tensors: tuple[str, ...]  # the activations it reads, which a 16-bit upgrade widens (an Add reads two)
    local_sqnr_db: float | None
    hint: str
    inputs_from: tuple[str, ...] = ()  # the quantized layers producing its input (ptqflow.models.graph.layer_map.input_layers)

    def kinds(self, available: tuple[str, ...]) -> tuple[str, ...]:
        """The upgrades of this layer worth measuring: fp32+inputs only when some quantized layer feeds it (else it
        is fp32)."""
        return tuple(kind for kind in available if kind != "fp32+inputs" or self.inputs_from)

    def upgrade(self, kind: str) -> Upgrade:
        return Upgrade(self.layer, kind, self.input_tensors if kind == "int16" else (),
                       self.inputs_from if kind == "fp32+inputs" else ())


def candidate_rounds(diagnosis, limit: int = DEFAULT_CANDIDATES, inputs: dict[str, tuple[str, ...]] | None = None,
                     tensors: dict[str, tuple[str, ...]] | None = None) -> list[list[Candidate]]:
    """Every quantized layer of `diagnosis` (ptqflow.models.diagnosis.records.Diagnosis), in the rounds the search ranks them: first
    the `limit` worst by local SQNR (the table's order) and any other layer with a hint or without a local SQNR (FX
    cannot shadow a quantized add_relu, ResNet's residual sums: the pre-filter has nothing to judge them by); then
    the rest, `limit` at a time, worst first. `inputs` maps a layer to the layers whose output it reads
    (ptqflow.models.graph.layer_map.input_layers): the quantized ones go FP32 with it in an fp32+inputs upgrade; `tensors` to the
    activations it reads (ptqflow.models.graph.layer_map.activation_inputs; default: the diagnosis' input tensor)."""
    rows = [row for row in diagnosis.worst_first() if row.quantized]
    quantized = {row.layer for row in rows}
    measured = [row for row in rows if row.local_sqnr_db is not None]
    first = measured[:limit] + [row for row in rows if row not in measured[:limit]
                                and (row.hint or row.local_sqnr_db is None)]
    rest = [row for row in rows if row not in first]
    rounds = [first] + [rest[start:start + limit] for start in range(0, len(rest), limit)]

    def candidate(row) -> Candidate:
        return Candidate(row.layer, row.op_type, (tensors or {}).get(row.layer) or (row.input_tensor,),
                         row.local_sqnr_db, row.hint,
                         tuple(name for name in (inputs or {}).get(row.layer, ()) if name in quantized))

    return [[candidate(row) for row in chosen] for chosen in rounds if chosen]


def candidates(diagnosis, limit: int = DEFAULT_CANDIDATES, inputs: dict[str, tuple[str, ...]] | None = None,
               tensors: dict[str, tuple[str, ...]] | None = None) -> list[Candidate]:
    """The first round of `candidate_rounds`."""
    rounds = candidate_rounds(diagnosis, limit, inputs, tensors)
    return rounds[0] if rounds else []


@dataclass
class Ranked:
    """One candidate and what each upgrade of it alone measured on the ranking images."""

    candidate: Candidate
    measured: dict[str, Measurement] = field(default_factory=dict)  # kind -> measurement
    refused: dict[str, str] = field(default_factory=dict)  # kind -> why the backend could not make it

    @property
    def best(self) -> tuple[float, float]:
        return max((m.score for m in self.measured.values()), default=(-math.inf, -math.inf))

    def sort_key(self):
        local = self.candidate.local_sqnr_db
        return -self.best[0], -self.best[1], local if local is not None else math.inf

    def to_dict(self) -> dict:
        c = self.candidate
        return {"layer": c.layer, "op_type": c.op_type, "input_tensors": list(c.input_tensors),
                "inputs_from": list(c.inputs_from), "local_sqnr_db": _db(c.local_sqnr_db), "hint": c.hint,
                "measured": {kind: m.to_dict() for kind, m in self.measured.items()}, "refused": dict(self.refused)}


@dataclass(frozen=True)
class Step:
    """One greedy step: the config with `upgrades` (this step's `change` among them), measured on the full set."""

    number: int
    change: Upgrade
    upgrades: tuple[Upgrade, ...]
    measurement: Measurement | None  # None when the backend refused the config
    reason: str = ""  # why the backend refused it

    @property
    def decision(self) -> str:
        """added (the search goes on from this config) or refused (from the one before)."""
        return "added" if self.measurement is not None else "refused"

    def to_dict(self) -> dict:
        return {"step": self.number, "change": self.change.to_dict(), "layers": [u.to_dict() for u in self.upgrades],
                "decision": self.decision, "reason": self.reason,
                "measured": self.measurement.to_dict() if self.measurement else None}


@dataclass
class SearchResult:
    variant: str
    target: FallbackTarget
    start: Measurement  # the variant as it is, on all the selection images
    ranking_images: int
    ranked: list[Ranked]  # every candidate ranked, round after round, each round best first
    steps: list[Step]
    upgrades: tuple[Upgrade, ...]  # the best config's, in the order added; empty when no step got closer
    final: Measurement  # the best config's numbers on all the selection images (`start` when no step got closer)
    reached: bool
    best_step: int | None = None  # the step that measured `final`
    selected_on: str = "test"  # "validation" (held-out training images) or "test": what the numbers above are on

    @property
    def mixed_name(self) -> str:
        return self.variant + MIXED_SUFFIX

    def mixed_spec(self, spec: VariantSpec) -> VariantSpec | None:
        """The `-mixed` variant: `spec` with the best config's upgrades; None when no step came closer."""
        if not self.upgrades:
            return None
        return VariantSpec(self.mixed_name, spec.framework, apply_upgrades(spec.config, self.upgrades),
                           Mixed(spec.name, self.upgrades, self.target.describe(), self.reached))

    def summary(self) -> str:
        """One line: reached or not, with what, and the numbers."""
        where = "held-out training images" if self.selected_on == "validation" else "test images"
        numbers = (f"agreement {100 * self.final.agreement:.2f}% (was {100 * self.start.agreement:.2f}%), accuracy "
                   f"{100 * self.final.accuracy:.2f}% on {self.final.images} {where}")
        layers = ", ".join(u.label for u in self.upgrades)
        if self.reached:
            return (f"{self.variant}: {self.target.describe()} reached by upgrading {len(self.upgrades)} of "
                    f"{len(self.ranked)} candidate layers ({layers}): {numbers} -> {self.mixed_name}")
        if self.upgrades:
            return (f"{self.variant}: {self.target.describe()} not reached; the {len(self.ranked)} candidate layers "
                    f"got to {numbers} with {layers}; best attempt recorded as {self.mixed_name}")
        return (f"{self.variant}: {self.target.describe()} not reached; no upgrade of its {len(self.ranked)} "
                f"candidate layers brought it closer ({numbers}); no {self.mixed_name} variant")

    def to_dict(self) -> dict:
        return {"variant": self.variant, "target": self.target.describe(), "reached": self.reached,
                "summary": self.summary(),
                "start": self.start.to_dict(), "final": self.final.to_dict(), "best_step": self.best_step,
                "layers": [u.to_dict() for u in self.upgrades], "ranking_images": self.ranking_images,
                "selected_on": self.selected_on,
                "ranking": [r.to_dict() for r in self.ranked], "steps": [s.to_dict() for s in self.steps]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


Measure = Callable[[VariantSpec, "int | None"], Measurement]  # a config, on the first N test images (None: all)
# Opens a step's record before it is measured (number, change, all upgrades); yields the function that records it.
StepScope = Callable[[int, Upgrade, tuple], ContextManager[Callable[[Step], None]]]


@contextmanager
def _no_record(number: int, change: Upgrade, upgrades: tuple):
    yield lambda step: None


class FallbackSearch:
    """Rank the candidate layers of one variant, then restore them greedily until `target` holds."""

    def __init__(self, measure: Measure, target: FallbackTarget, reference_accuracy: float,
                 candidates: int = DEFAULT_CANDIDATES, ranking_images: int = DEFAULT_RANKING_IMAGES,
                 step_scope: StepScope | None = None, announce: Callable[[str], None] = lambda line: None):
        check_options(target, 1, ranking_images, candidates)
        self.measure = measure
        self.target = target
        self.reference_accuracy = reference_accuracy
        self.candidates = candidates
        self.ranking_images = ranking_images
        self.step_scope = step_scope or _no_record
        self.announce = announce

    def shortfall(self, m: Measurement) -> float:
        return self.target.shortfall(m.accuracy, m.agreement, self.reference_accuracy)

    def rank(self, spec: VariantSpec, chosen: list[Candidate]) -> list[Ranked]:
        """Each candidate upgraded alone (each kind the backend has), measured on the ranking images; best first."""
        kinds = upgrade_kinds(spec.config)
        ranked = [Ranked(c) for c in chosen]
        total = sum(len(c.kinds(kinds)) for c in chosen)
        with progress_task(f"ranking {len(chosen)} layers of {spec.name}", total=total) as advance:
            for entry in ranked:
                for kind in entry.candidate.kinds(kinds):
                    checkpoint()
                    try:
                        config = apply_upgrades(spec.config, (entry.candidate.upgrade(kind),))
                        entry.measured[kind] = self.measure(replace(spec, config=config), self.ranking_images)
                    except Exception as exc:  # noqa: BLE001 - a config the backend refuses is not a candidate
                        if not backend_error(exc):
                            raise  # a ptqflow bug, a bad option, the tracking store: no refusal of the backend's
                        entry.refused[kind] = failure_reason(exc)[:500]
                    advance(1)
        return sorted(ranked, key=Ranked.sort_key)

    def run(self, spec: VariantSpec, start: Measurement, diagnosis,
            inputs: dict[str, tuple[str, ...]] | None = None,
            tensors: dict[str, tuple[str, ...]] | None = None) -> SearchResult:
        """Search from `spec` as it is (`start`: its numbers on the full test set) with the layers of `diagnosis`;
        `inputs`, `tensors`: see `candidate_rounds`. When a round's candidates run out short of the target, the next
        round's are ranked and restored the same way, from the config reached."""
        rounds = candidate_rounds(diagnosis, self.candidates, inputs, tensors)
        ranked: list[Ranked] = []
        current: dict[str, Upgrade] = {}  # layer -> its upgrade, in the order added
        best, best_upgrades, best_step, steps = None, (), None, []
        for number, chosen in enumerate(rounds, 1):
            if best is not None and self.shortfall(best) == 0:
                break
            self.announce(f"{spec.name}: {self.target.describe()} missed (agreement {100 * start.agreement:.2f}%, "
                          f"accuracy {100 * start.accuracy:.2f}%); ranking {len(chosen)} candidate layers on "
                          f"{min(self.ranking_images, start.images)} images" if number == 1 else
                          f"{spec.name}: not reached with {len(ranked)} candidate layers; ranking the next "
                          f"{len(chosen)}")
            ranked_now = self.rank(spec, chosen)
            ranked += ranked_now
            current, best, best_upgrades, best_step = self._restore(spec, ranked_now, current, steps, best,
                                                                    best_upgrades, best_step)
        if best is None or self.shortfall(best) >= self.shortfall(start) - _EPSILON:
            best, best_upgrades, best_step = start, (), None  # no step got closer than the variant itself
        return SearchResult(spec.name, self.target, start, min(self.ranking_images, start.images), ranked, steps,
                            best_upgrades, best, self.shortfall(best) == 0, best_step)

    def _restore(self, spec: VariantSpec, ranked: list[Ranked], current: dict, steps: list, best, best_upgrades,
                 best_step):
        """One round's greedy restore, from the config `current`; appends to `steps`, returns the config reached and
        the best so far."""
        available = upgrade_kinds(spec.config)
        # 16 bits first where the backend has them, FP32 last: a pass over the ranked layers per group of kinds
        for kinds in [group for group in (("int16",), ("fp32", "fp32+inputs")) if set(group) & set(available)]:
            for entry in sorted((e for e in ranked if set(kinds) & set(e.measured)),
                                key=lambda e: _pass_key(e, kinds)):
                if best is not None and self.shortfall(best) == 0:
                    break
                change = entry.candidate.upgrade(_best_kind(entry, kinds))
                fp32 = {name for u in current.values() for name in u.fp32_layers}
                if change.fp32_layers and set(change.fp32_layers) <= fp32:
                    continue  # FP32 already, through another layer's fp32+inputs
                # a layer's FP32 upgrade replaces its 16-bit one; so does FP32 through another's fp32+inputs
                proposal = {layer: u for layer, u in current.items()
                            if not (u.kind == "int16" and layer in change.fp32_layers)}
                proposal[change.layer] = change
                step = self._step(spec, len(steps) + 1, change, tuple(proposal.values()))
                steps.append(step)
                if step.measurement is None:
                    self.announce(f"  step {step.number}: {change.label} refused: {step.reason}")
                    continue  # the search goes on from the config before
                current, closer = proposal, best is None or self._closer(step.measurement, best)
                if closer:
                    best, best_upgrades, best_step = step.measurement, tuple(proposal.values()), step.number
                self.announce(f"  step {step.number}: {change.label} -> agreement "
                              f"{100 * step.measurement.agreement:.2f}%, accuracy "
                              f"{100 * step.measurement.accuracy:.2f}%"
                              f"{' (target reached)' if self.shortfall(step.measurement) == 0 else ''}")
        return current, best, best_upgrades, best_step

    def _closer(self, measured: Measurement, best: Measurement) -> bool:
        """Closer to the target than the best step so far: less shortfall, or as little and higher logit SQNR."""
        ours, theirs = self.shortfall(measured), self.shortfall(best)
        if ours < theirs - _EPSILON:
            return True
        return abs(ours - theirs) <= _EPSILON and measured.logit_sqnr_db > best.logit_sqnr_db

    def _step(self, spec: VariantSpec, number: int, change: Upgrade, upgrades: tuple[Upgrade, ...]) -> Step:
        with self.step_scope(number, change, upgrades) as record:
            checkpoint()
            try:
                measured = self.measure(replace(spec, config=apply_upgrades(spec.config, upgrades)), None)
            except Exception as exc:  # noqa: BLE001 - the backend's refusal is recorded as such; the search goes on
                if not backend_error(exc):
                    raise  # a ptqflow bug, a bad option, the tracking store: no refusal of the backend's
                step = Step(number, change, upgrades, None, failure_reason(exc)[:500])
            else:
                step = Step(number, change, upgrades, measured)
            record(step)
        return step


def _pass_key(entry: Ranked, kinds: tuple[str, ...]):
    """Best first by what the pass's kinds measured on the ranking images (Measurement.score), then worst local
    SQNR."""
    first, second = max(entry.measured[k].score for k in kinds if k in entry.measured)
    local = entry.candidate.local_sqnr_db
    return -first, -second, local if local is not None else math.inf


def _best_kind(entry: Ranked, kinds: tuple[str, ...]) -> str:
    """The pass's kind that measured best on the ranking images; the cheaper one on a tie."""
    measured = [k for k in kinds if k in entry.measured]
    return max(measured, key=lambda k: (entry.measured[k].score, -measured.index(k)))


def _db(value: float | None):
    """A dB value for JSON: "inf" for no noise at all, None when not measured."""
    if value is None or math.isnan(value):
        return None
    return value if math.isfinite(value) else "inf"


def search(runner, result, target: FallbackTarget, candidates: int = DEFAULT_CANDIDATES,
           ranking_images: int = DEFAULT_RANKING_IMAGES, step_scope: StepScope | None = None,
           announce: Callable[[str], None] = lambda line: None) -> SearchResult:
    """The search for one variant made by `runner` (ptqflow.pipelines.variants.runner.VariantRunner, reference run):
    `result` is its VariantResult. Uses the result's diagnosis, or diagnoses the variant again (quantizing it) when
    it has none. Every measurement is on the selection images (selection_images)."""
    from ptqflow.models.graph.layer_map import activation_inputs, input_layers

    spec = result.spec
    diagnosis = result.diagnosis or runner.diagnose(spec)
    model = runner.quantization_source.onnx.proto
    inputs, tensors = input_layers(model), activation_inputs(model)
    on, images = selection_images(runner)
    if on == "test":
        start = Measurement(result.evaluation.accuracy, result.fidelity.top1_agreement, result.fidelity.sqnr_db,
                            images)
    else:
        start = Measurement.of(*runner.measure(spec, None, on))

    def measure(config_spec: VariantSpec, limit: int | None) -> Measurement:
        return Measurement.of(*runner.measure(config_spec, limit, on))

    found = FallbackSearch(measure, target, runner.selection_reference(on).accuracy, candidates, ranking_images,
                           step_scope, announce).run(spec, start, diagnosis, inputs, tensors)
    return replace(found, selected_on=on)


def selection_images(runner) -> tuple[str, int]:
    """("validation", count) when the runner holds held-out training images, else ("test", count): the images the
    search ranks and restores on."""
    held_out = len(runner.inputs.validation)
    return ("validation", held_out) if held_out else ("test", len(runner.inputs.test))


def misses(target: FallbackTarget, result, reference_accuracy: float) -> bool:
    """Whether a finished variant (VariantResult or the sweep's VariantOutcome) is one the search should repair:
    a quantized variant, not itself a `-mixed` one, that misses the target on the full test set."""
    spec = result.spec
    if not target.active or result.status != "ok" or spec is None or spec.mixed is not None:
        return False
    if result.evaluation is None or result.fidelity is None:
        return False
    return target.shortfall(result.evaluation.accuracy, result.fidelity.top1_agreement, reference_accuracy) > 0


def repair_untracked(runner, result, target: FallbackTarget, candidates: int = DEFAULT_CANDIDATES,
                     ranking_images: int = DEFAULT_RANKING_IMAGES) -> VariantSpec | None:
    """The Python API without tracking: the `-mixed` spec for `result` when it misses the target and some upgrade
    brought it closer, else None; the outcome is one line on the terminal. A search that fails is one line too."""
    if runner.reference is None or not misses(target, result, runner.reference.accuracy):
        return None
    try:
        found = search(runner, result, target, candidates, ranking_images, announce=say)
    except (ConfigError, TrackingError):
        raise
    except Exception as exc:  # noqa: BLE001 - as a failing variant does, a failing search leaves the others
        say(f"[red]✗[/] {result.name}: the fallback search failed ({failure_reason(exc)[:500]})")
        return None
    say(("[green]✓[/] " if found.reached else "[yellow]![/] ") + found.summary())
    return found.mixed_spec(result.spec)


def mixed_params(spec: VariantSpec | None) -> dict:
    """A `-mixed` variant's params: the variant it repairs, the layers it upgraded and the target; {} otherwise."""
    from ptqflow.tracking.keys import Param

    if spec is None or spec.mixed is None:
        return {}
    return {Param.FALLBACK_OF: spec.mixed.of, Param.FALLBACK_LAYERS: ",".join(u.label for u in spec.mixed.upgrades),
            Param.FALLBACK_TARGET: spec.mixed.target}
