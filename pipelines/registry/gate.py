"""The promotion gate: when a newly registered version may take the `champion` alias.

Pure logic, no MLflow: a version must stay within the accuracy-drop and agreement limits, not be slower than FP32
at batch 1 in every timing round (unless the policy allows it), and beat the current champion on agreement with
FP32. On an agreement tie it must be clearly faster at batch 1, and a version made from the same inputs as the
champion (a re-run) or with a byte-identical model file never replaces it: on a shared
machine the same file's batch-1 latency moves by up to 1.6x between runs, so a bare "faster" would hand the alias
back and forth on noise. Nor does a latency decide between timings that do not compare: only when neither was
timed on a busy machine and both were timed on the same CPU model, with the same int8 instructions and threads.

Two versions are compared only when they were measured on the same job: the same FP32 model, test set (dataset
digest and number of images), input layout and preprocessing, and, where versions record them, input size, resizing
and mean/std. A 100-image sweep that agrees on 100 of 100 images says nothing about a version measured on 10,000,
so it is "not comparable" and never takes the alias on its own;
`ptqflow promote` remains the manual way. Values are compared as they are recorded in the registry (rounded), so a
tie the registry shows is a tie here."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ptqflow.tracking.keys import VersionTag as V

CHAMPION_ALIAS = "champion"


@dataclass(frozen=True)
class GatePolicy:
    max_accuracy_drop_pp: float = 0.5  # accuracy may fall at most this many points below FP32
    min_agreement: float = 0.97  # share of test images whose top-1 equals FP32's
    min_latency_gain: float = 0.25  # on an agreement tie, batch-1 latency must be at least this fraction lower
    allow_slower: bool = False  # promote a version slower than FP32 at batch 1 (an int8 model is made to be faster)

    def describe(self) -> str:
        return (f"accuracy drop <= {self.max_accuracy_drop_pp:g} pp, agreement >= {self.min_agreement:g}, "
                + ("" if self.allow_slower else "not slower than FP32 at batch 1, ")
                + f"ties need >= {100 * self.min_latency_gain:g}% lower batch-1 latency")


# What must be equal for two versions' numbers to be comparable, with the words a decision uses for each.
COMPARABILITY = ((V.FP32_MODEL_SHA256, "FP32 model"), (V.DATASET_DIGEST, "test set"),
                 (V.TEST_IMAGES, "number of test images"), (V.INPUT_LAYOUT, "input layout"),
                 (V.PREPROCESSING, "preprocessing"))
# Recorded only by newer versions: a missing tag means what older versions did (no resizing, no mean/std), or, for
# the input size, that the version does not say (then the FP32 model's digest stands for it).
OPTIONAL_COMPARABILITY = ((V.INPUT_SIZE, "input size", None), (V.RESIZE, "resizing", "none"),
                          (V.INPUT_MEAN, "mean", ""), (V.INPUT_STD, "std", ""))


# What must be recorded and equal for two versions' batch-1 latencies to be compared (a latency tie-break).
TIMING_COMPARABILITY = ((V.CPU_MODEL, "CPU"), (V.CPU_INT8_ISA, "int8 instructions"), (V.BENCH_THREADS, "threads"))


@dataclass(frozen=True)
class Candidate:
    version: str
    accuracy_delta_pp: float
    agreement: float
    latency_ms: float | None = None
    sha256: str | None = None  # of the registered model file
    # of the run that made it: model, data, calibration, config, library versions, ptqflow's source, CPU, threads
    input_key: str | None = None
    measured_on: tuple[tuple[str, str], ...] = ()  # COMPARABILITY keys and values: what the numbers were measured on
    # LATENCY_CONTENDED and TIMING_COMPARABILITY keys and values: how the latency was timed
    timed_on: tuple[tuple[str, str], ...] = ()
    speedup_b1: float | None = None  # FP32's batch-1 latency over this version's, timed in the same rounds
    speedup_b1_max: float | None = None  # the largest of those ratios over the rounds

    @classmethod
    def from_tags(cls, version: str, tags: dict[str, str]) -> "Candidate":
        """A version as the registry records it: the gate compares recorded values, never unrounded floats."""
        latency = tags.get(V.LATENCY_MS_B1)
        return cls(str(version), float(tags.get(V.ACCURACY_DELTA_PP, "nan")), float(tags.get(V.TOP1_AGREEMENT, "nan")),
                   float(latency) if latency else None, tags.get(V.SHA256), tags.get(V.INPUT_KEY),
                   tuple((key, tags[key]) for key, *_ in (*COMPARABILITY, *OPTIONAL_COMPARABILITY) if key in tags),
                   tuple((key, tags[key]) for key in (V.LATENCY_CONTENDED, *(k for k, _ in TIMING_COMPARABILITY))
                         if key in tags),
                   float(tags[V.SPEEDUP_B1]) if tags.get(V.SPEEDUP_B1) else None,
                   float(tags[V.SPEEDUP_B1_MAX]) if tags.get(V.SPEEDUP_B1_MAX) else None)


def incomparable(candidate: Candidate, champion: Candidate) -> str | None:
    """Why the two versions' numbers cannot be compared, or None when they were measured on the same job."""
    ours, theirs = dict(candidate.measured_on), dict(champion.measured_on)
    differ = []
    for key, words in COMPARABILITY:
        if key not in theirs or key not in ours:
            differ.append(f"{words} not recorded")
        elif ours[key] != theirs[key]:
            a, b = (ours[key][:12], theirs[key][:12]) if len(ours[key]) == 64 else (ours[key], theirs[key])
            differ.append(f"{words} {a} vs {b}")
    for key, words, missing in OPTIONAL_COMPARABILITY:
        a, b = ours.get(key, missing), theirs.get(key, missing)
        if a is not None and b is not None and a != b:
            differ.append(f"{words} {a or 'none'} vs {b or 'none'}")
    return "; ".join(differ) or None


def timings_incomparable(candidate: Candidate, champion: Candidate) -> str | None:
    """Why the two versions' latencies cannot decide a tie, or None when both were timed alike: neither on a busy
    machine, both on the same CPU model with the same int8 instructions and threads. Anything not recorded (older
    versions) cannot be shown to compare."""
    if candidate.latency_ms is None or champion.latency_ms is None:
        return "no latency recorded"
    ours, theirs = dict(candidate.timed_on), dict(champion.timed_on)
    why = [f"v{version} was timed on a busy machine" for version, timed in
           ((candidate.version, ours), (champion.version, theirs)) if timed.get(V.LATENCY_CONTENDED, "yes") != "no"]
    for key, words in TIMING_COMPARABILITY:
        if key not in ours or key not in theirs:
            why.append(f"{words} not recorded")
        elif ours[key] != theirs[key]:
            why.append(f"{words} {ours[key]} vs {theirs[key]}")
    return "; ".join(why) or None


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def slower_than_fp32(candidate: Candidate) -> bool:
    """Slower than FP32 at batch 1 in every round it was timed in against FP32 (the largest ratio below 1), or, for a
    version that records only the median, by that median. A ratio near 1 that some round finds faster is noise on a
    shared machine, not a slower model."""
    if candidate.speedup_b1 is None:
        return False
    return (candidate.speedup_b1_max if candidate.speedup_b1_max is not None else candidate.speedup_b1) < 1


def decide(candidate: Candidate, champion: Candidate | None, policy: GatePolicy) -> Decision:
    if candidate.accuracy_delta_pp < -policy.max_accuracy_drop_pp:
        return Decision(False, f"accuracy drop {-candidate.accuracy_delta_pp:.2f} pp exceeds "
                               f"{policy.max_accuracy_drop_pp:g} pp")
    if candidate.agreement < policy.min_agreement:
        return Decision(False, f"agreement {candidate.agreement:.4f} is below {policy.min_agreement:g}")
    if slower_than_fp32(candidate) and not policy.allow_slower:
        return Decision(False, f"slower than FP32 at batch 1 in every timing round ({candidate.speedup_b1:.2f}x "
                               "FP32's speed): not promoted; --allow-slower promotes a slower version")
    if champion is None:
        return Decision(True, f"passes the gate ({policy.describe()}); no champion yet")
    if math.isnan(champion.agreement):
        return Decision(False, f"champion v{champion.version} has no recorded agreement to compare with; "
                               "`ptqflow promote` moves the alias by hand")
    why = incomparable(candidate, champion)
    if why:
        return Decision(False, f"not comparable with champion v{champion.version}: {why}; "
                               "`ptqflow promote` moves the alias by hand")
    if candidate.sha256 and candidate.sha256 == champion.sha256:
        return Decision(False, f"same model file as champion v{champion.version} (sha256 {candidate.sha256[:12]})")
    if candidate.input_key and candidate.input_key == champion.input_key:
        return Decision(False, f"same inputs as champion v{champion.version} (input key {candidate.input_key[:12]}): "
                               "a re-run, not a new model")
    if candidate.agreement > champion.agreement:
        return Decision(True, f"agreement {candidate.agreement:.4f} beats champion v{champion.version} "
                              f"({champion.agreement:.4f})")
    if candidate.agreement == champion.agreement and None not in (candidate.latency_ms, champion.latency_ms):
        why = timings_incomparable(candidate, champion)
        if why:
            return Decision(False, f"ties champion v{champion.version} on agreement ({candidate.agreement:.4f}); "
                                   f"latencies not comparable ({why})")
        if candidate.latency_ms <= (1 - policy.min_latency_gain) * champion.latency_ms:
            return Decision(True, f"ties champion v{champion.version} on agreement ({candidate.agreement:.4f}) "
                                  f"and is faster ({candidate.latency_ms:.3f} ms vs {champion.latency_ms:.3f} ms)")
    return Decision(False, f"agreement {candidate.agreement:.4f} does not beat champion v{champion.version} "
                           f"({champion.agreement:.4f})")
