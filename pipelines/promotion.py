"""The promotion gate: when a newly registered version may take the `champion` alias.

Pure logic, no MLflow: a version must stay within the accuracy-drop and agreement limits and beat the current
champion on agreement with FP32 (ties go to the lower batch-1 latency)."""

from __future__ import annotations

from dataclasses import dataclass

CHAMPION_ALIAS = "champion"


@dataclass(frozen=True)
class GatePolicy:
    max_accuracy_drop_pp: float = 0.5  # accuracy may fall at most this many points below FP32
    min_agreement: float = 0.97  # share of test images whose top-1 equals FP32's

    def describe(self) -> str:
        return f"accuracy drop <= {self.max_accuracy_drop_pp:g} pp, agreement >= {self.min_agreement:g}"


@dataclass(frozen=True)
class Candidate:
    version: str
    accuracy_delta_pp: float
    agreement: float
    latency_ms: float | None = None


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
    if candidate.agreement > champion.agreement:
        return Decision(True, f"agreement {candidate.agreement:.4f} beats champion v{champion.version} "
                              f"({champion.agreement:.4f})")
    if candidate.agreement == champion.agreement and None not in (candidate.latency_ms, champion.latency_ms) \
            and candidate.latency_ms < champion.latency_ms:
        return Decision(True, f"ties champion v{champion.version} on agreement ({candidate.agreement:.4f}) "
                              f"and is faster ({candidate.latency_ms:.3f} ms vs {champion.latency_ms:.3f} ms)")
    return Decision(False, f"agreement {candidate.agreement:.4f} does not beat champion v{champion.version} "
                           f"({champion.agreement:.4f})")
