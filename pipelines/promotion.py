"""The promotion gate: when a newly registered version may take the `champion` alias.

Pure logic, no MLflow: a version must stay within the accuracy-drop and agreement limits and beat the current
champion on agreement with FP32. On an agreement tie it must be clearly faster at batch 1, and a version made from
the same inputs as the champion (a re-run) or with a byte-identical model file never replaces it: on a shared
machine the same file's batch-1 latency moves by up to 1.6x between runs, so a bare "faster" would hand the alias
back and forth on noise."""

from __future__ import annotations

from dataclasses import dataclass

CHAMPION_ALIAS = "champion"


@dataclass(frozen=True)
class GatePolicy:
    max_accuracy_drop_pp: float = 0.5  # accuracy may fall at most this many points below FP32
    min_agreement: float = 0.97  # share of test images whose top-1 equals FP32's
    min_latency_gain: float = 0.25  # on an agreement tie, batch-1 latency must be at least this fraction lower

    def describe(self) -> str:
        return (f"accuracy drop <= {self.max_accuracy_drop_pp:g} pp, agreement >= {self.min_agreement:g}, "
                f"ties need >= {100 * self.min_latency_gain:g}% lower batch-1 latency")


@dataclass(frozen=True)
class Candidate:
    version: str
    accuracy_delta_pp: float
    agreement: float
    latency_ms: float | None = None
    sha256: str | None = None  # of the registered model file
    input_key: str | None = None  # of the run that made it: model, data, calibration, config, library versions


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(candidate: Candidate, champion: Candidate | None, policy: GatePolicy) -> Decision:
    if candidate.accuracy_delta_pp < -policy.max_accuracy_drop_pp:
        return Decision(False, f"accuracy drop {-candidate.accuracy_delta_pp:.2f} pp exceeds "
                               f"{policy.max_accuracy_drop_pp:g} pp")
    if candidate.agreement < policy.min_agreement:
        return Decision(False, f"agreement {candidate.agreement:.4f} is below {policy.min_agreement:g}")
    if champion is None:
        return Decision(True, f"passes the gate ({policy.describe()}); no champion yet")
    if candidate.sha256 and candidate.sha256 == champion.sha256:
        return Decision(False, f"same model file as champion v{champion.version} (sha256 {candidate.sha256[:12]})")
    if candidate.input_key and candidate.input_key == champion.input_key:
        return Decision(False, f"same inputs as champion v{champion.version} (input key {candidate.input_key[:12]}): "
                               "a re-run, not a new model")
    if candidate.agreement > champion.agreement:
        return Decision(True, f"agreement {candidate.agreement:.4f} beats champion v{champion.version} "
                              f"({champion.agreement:.4f})")
    if candidate.agreement == champion.agreement and None not in (candidate.latency_ms, champion.latency_ms) \
            and candidate.latency_ms <= (1 - policy.min_latency_gain) * champion.latency_ms:
        return Decision(True, f"ties champion v{champion.version} on agreement ({candidate.agreement:.4f}) "
                              f"and is faster ({candidate.latency_ms:.3f} ms vs {champion.latency_ms:.3f} ms)")
    return Decision(False, f"agreement {candidate.agreement:.4f} does not beat champion v{champion.version} "
                           f"({champion.agreement:.4f})")
