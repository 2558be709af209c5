"""A sweep's plots on their way to their runs: drawn in the plot worker (a background process while the next variant
runs), then logged on each run, which may have ended by then."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ptqflow.common.errors import failure_reason
from ptqflow.pipelines.reports.plot_worker import PendingPlot, PlotWorker
from ptqflow.tracking import records


class PlotQueue:
    """Plots submitted for runs, logged in submission order. A plot that cannot be drawn is tagged on its run (the
    error tag the submitter names), never the run's failure."""

    def __init__(self):
        self.worker = PlotWorker(background=False)
        self._pending: list[tuple[str, str, str, PendingPlot]] = []  # (run id, artifact, error tag, plot)

    def __len__(self) -> int:
        return len(self._pending)

    @contextlib.contextmanager
    def drawing_in_background(self) -> Iterator[PlotQueue]:
        """Inside, plots are drawn by a background process; outside, each is drawn and logged as it is submitted."""
        with PlotWorker() as self.worker:
            try:
                yield self
            finally:
                self.worker = PlotWorker(background=False)

    def submit(self, run_id: str, artifact: str, error_tag: str, function, *args) -> None:
        """Draw `function(*args)` (a PNG) as `artifact` of run `run_id`: now, or in the background worker and logged
        by log()."""
        self._pending.append((run_id, artifact, error_tag, self.worker.submit(function, *args)))
        if not self.worker.background:
            self.log()

    def log(self, upto: int | None = None) -> None:
        """Wait for the plots submitted (the first `upto` of them, else all) and log each on its run."""
        count = len(self._pending) if upto is None else upto
        done, self._pending = self._pending[:count], self._pending[count:]
        for run_id, artifact, error_tag, pending in done:
            try:
                png = pending.result()
            except Exception as exc:  # noqa: BLE001 - the run's numbers stand without the picture
                records.set_run_tags(run_id, {error_tag: f"{artifact}: {failure_reason(exc)}"[:5000]})
                continue
            records.log_bytes_to_run(run_id, png, artifact)

    def log_if_possible(self) -> None:
        """After an error or a stop, the plots of the runs that ended before it, where they can still be logged
        (the worker ignores Ctrl-C, so it finishes drawing them)."""
        try:
            self.log()
        except Exception:  # noqa: BLE001 - the error that stopped the sweep is the one to report
            self._pending = []

