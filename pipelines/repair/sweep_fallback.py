"""The sweep's side of the sensitivity-ranked fallback (ptqflow.pipelines.repair.fallback): each search recorded
in MLflow, its steps as child runs of the variant's run, and a resumed sweep's reuse of an earlier search."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager

from ptqflow.common.errors import ConfigError, failure_reason
from ptqflow.pipelines.repair.fallback import (DEFAULT_CANDIDATES, DEFAULT_RANKING_IMAGES, MIXED_SUFFIX,
                                               FallbackTarget, Step, misses, search, selection_images)
from ptqflow.pipelines.shared.progress import say
from ptqflow.pipelines.variants.specs import Mixed, Upgrade, VariantSpec, apply_upgrades


class SweepFallback:
    """The sweep's side of the search: for each variant that misses the target, the search with every step a child
    run of the variant's run (FINISHED, with its params and metrics, tagged added or refused), the whole
    search as `fallback/search.json` and a one-line `ptqflow.fallback` tag on the variant's run, and the `-mixed`
    spec the sweep then runs like any variant. A search that fails says so on the variant's run and in one line;
    it fails neither the variant nor the sweep."""

    def __init__(self, target: FallbackTarget, runner, candidates: int = DEFAULT_CANDIDATES,
                 ranking_images: int = DEFAULT_RANKING_IMAGES, timer=None):
        self.target = target
        self.runner = runner
        self.candidates = candidates
        self.ranking_images = ranking_images
        self.timer = timer

    def repair(self, outcome, sweep_run_id: str) -> VariantSpec | None:
        """The `-mixed` spec for `outcome` (ptqflow.pipelines.sweep.outcomes.VariantOutcome, with its run id) when it
        misses the target and some upgrade brought it closer; None otherwise. The search is recorded on the variant's run, or,
        for a run an earlier sweep made (reused by --resume), on a new run under this sweep's run `sweep_run_id`:
        an earlier sweep's records are never written over, nor given runs it did not make."""
        from ptqflow.tracking import runs
        from ptqflow.tracking.keys import Tag

        if self.runner.reference is None or not misses(self.target, outcome, self.runner.reference.accuracy):
            return None
        # an earlier sweep's run, reused (ptqflow.pipelines.sweep.outcomes.outcome_of_run)
        if not outcome.reason.startswith("reused run"):
            return self._search(outcome, outcome.run_id)
        found, mixed = self._reused_search(outcome)
        if found:
            return mixed
        tags = {Tag.ROLE: Tag.ROLE_FALLBACK_SEARCH, Tag.FALLBACK_OF: outcome.name,
                Tag.FALLBACK_VARIANT_RUN: outcome.run_id}
        with runs.child_run(sweep_run_id, f"{outcome.name} · fallback search", tags) as search_run:
            return self._search(outcome, search_run.run_id)

    def _search(self, outcome, record_on: str) -> VariantSpec | None:
        """Search for `outcome`, its steps as child runs of run `record_on`, its result on that run."""
        from contextlib import nullcontext

        from ptqflow.tracking import records
        from ptqflow.tracking.keys import Artifact, Tag
        from ptqflow.tracking.runs import tracking_failure

        try:
            with self.timer.phase("fallback") if self.timer else nullcontext():
                result = search(self.runner, outcome, self.target, self.candidates, self.ranking_images,
                                step_scope=lambda *step: self._step_run(outcome, record_on, *step), announce=say)
        except Exception as exc:  # noqa: BLE001 - the variant stands; the search's failure is recorded on it
            if isinstance(exc, ConfigError) or tracking_failure(exc) is not None:
                raise  # the user's to fix, or the tracking store's: the sweep stops and says so
            reason = failure_reason(exc)[:500]
            records.set_run_tags(record_on, {Tag.FALLBACK: f"search failed: {reason}"[:5000]})
            say(f"[red]✗[/] {outcome.name}: the fallback search failed ({reason})")
            return None
        payload = {**result.to_dict(), "options": self._options()}
        records.log_bytes_to_run(record_on, (json.dumps(payload, indent=2) + "\n").encode(), Artifact.FALLBACK_SEARCH)
        records.set_run_tags(record_on, {Tag.FALLBACK: result.summary()[:5000]})
        say(("[green]✓[/] " if result.reached else "[yellow]![/] ") + result.summary())
        return result.mixed_spec(outcome.spec)

    def _options(self) -> dict:
        """What shapes a search besides the variant's inputs (its run's input key)."""
        on, images = selection_images(self.runner)
        return {"target": self.target.describe(), "fallback_candidates": self.candidates,
                "ranking_images": min(self.ranking_images, images), "selected_on": on}

    def _reused_search(self, outcome) -> tuple[bool, VariantSpec | None]:
        """For a variant run a resumed sweep reused: (True, its -mixed spec or None) when the run, or a search run an
        earlier resumed sweep made for it (newest first), holds a search made with the same options (same inputs,
        same search: the same result); (False, None) when it must search."""
        from ptqflow.tracking import records, runs
        from ptqflow.tracking.keys import Artifact, Tag

        experiment_id = runs.get_run(outcome.run_id).info.experiment_id
        searched_later = sorted((r for r in runs.runs_tagged(experiment_id, Tag.FALLBACK_VARIANT_RUN, outcome.run_id)
                                 if r.info.status == "FINISHED"), key=lambda r: r.info.start_time, reverse=True)
        for run_id in [outcome.run_id, *(r.info.run_id for r in searched_later)]:
            try:
                payload = json.loads(records.download_text(run_id, Artifact.FALLBACK_SEARCH))
            except Exception:  # noqa: BLE001 - no search on that run (or not readable): the next, or search again
                continue
            if payload.get("options") != self._options():
                continue
            upgrades = tuple(Upgrade(**layer) for layer in payload["layers"])
            say(f"[green]↺[/] {outcome.name}: reused the fallback search of run {run_id} (same inputs and "
                f"options): {payload.get('summary', '')}")
            if not upgrades:
                return True, None
            return True, VariantSpec(outcome.name + MIXED_SUFFIX, outcome.spec.framework,
                                     apply_upgrades(outcome.spec.config, upgrades),
                                     Mixed(outcome.name, upgrades, payload["target"], bool(payload["reached"])))
        return False, None

    @contextmanager
    def _step_run(self, outcome, parent_run_id: str, number: int, change: Upgrade, upgrades: tuple[Upgrade, ...]):
        from ptqflow.pipelines.shared import precision
        from ptqflow.tracking import runs
        from ptqflow.tracking.keys import Metric, Param, Tag

        tags = {Tag.ROLE: Tag.ROLE_FALLBACK_STEP, Tag.FALLBACK_OF: outcome.name}
        with runs.child_run(parent_run_id, f"{outcome.name} · step {number}: {change.label}", tags) as run:
            run.log_params({Param.FALLBACK_OF: outcome.name, Param.FALLBACK_STEP: number,
                            Param.FALLBACK_CHANGE: change.label,
                            Param.FALLBACK_LAYERS: ",".join(u.label for u in upgrades),
                            Param.FALLBACK_TARGET: self.target.describe()})

            on, _ = selection_images(self.runner)
            reference = self.runner.selection_reference(on).accuracy  # FP32 on the images the steps are measured on
            images_metric = Metric.TEST_IMAGES if on == "test" else Metric.HELD_OUT_IMAGES

            def record(step: Step) -> None:
                decision = {Tag.STEP_DECISION: step.decision, **({Tag.REASON: step.reason} if step.reason else {})}
                if step.measurement is not None:
                    m = step.measurement
                    run.log_metrics(precision.rounded({
                        Metric.ACCURACY: m.accuracy, Metric.ACCURACY_DELTA_PP: 100 * (m.accuracy - reference),
                        Metric.TOP1_AGREEMENT: m.agreement,
                        Metric.SQNR_DB: m.logit_sqnr_db if math.isfinite(m.logit_sqnr_db) else None,
                        images_metric: m.images}, m.images))
                run.set_tags(decision)

            yield record
