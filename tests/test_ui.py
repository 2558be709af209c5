"""The MLflow UI shows what a sweep records: headless Chromium (driven by Playwright) against `mlflow server`.

Two small sweeps go into a temp sqlite store (so `resnet8-int8` has versions 1 and 2 and the `champion` alias),
`mlflow server` serves that store on a free 127.0.0.1 port, and the browser checks the experiment's runs table, the
parent run's plots, a variant run's params and metrics, and the registered model page, saving a full-page screenshot
of each step into $PTQFLOW_SCREENSHOTS (default: a pytest temp dir).

Needs Debian's `chromium` (/usr/bin/chromium) and the `playwright` package used only as a driver (Playwright's own
browser download is never used); `bash .ci/browser.sh` installs both. Skipped, with the reason, when either is
missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CALIBRATION_SIZE
from processes import HOST, free_port, start_in_own_group, stop_process_groups, wait_ready

pytestmark = pytest.mark.ui

CHROMIUM = Path(os.environ.get("PTQFLOW_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 900}
EXPERIMENT = "resnet8-quantization"
MODEL = "resnet8-int8"
VARIANTS = ("pytorch-fx-int8", "ort-uint8")  # plus fp32, always run as the reference
SERVER_START_TIMEOUT = 120.0
UI_TIMEOUT_MS = 45_000  # first paint of the React app on 2 busy cores can take a while


def _skip_reason() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found; `bash .ci/browser.sh` installs Debian's chromium"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed; `bash .ci/browser.sh` installs it (driver only)"
    return None


_reason = _skip_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402


# ---- store and server -------------------------------------------------------------------------------------------
@dataclass
class UiStore:
    root: Path
    backend_uri: str
    experiment_id: str
    parent_run_ids: list[str]  # oldest first
    variant_run_id: str  # pytorch-fx-int8 of the latest sweep
    variant_params: dict[str, str]
    variant_metrics: dict[str, float]


@pytest.fixture(scope="module")
def ui_store(tmp_path_factory, cifar_dir, tiny_model) -> UiStore:
    """Two sweeps with the always-pass gate: resnet8-int8 versions 1 and 2, champion on one of them."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.promotion import GatePolicy
    from pipelines.sweep import SweepOptions, run_sweep

    root = tmp_path_factory.mktemp("ui_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)  # artifacts go to ./mlruns in the temp dir
        mlflow.set_tracking_uri(uri)
        try:
            results = [run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir,
                                              calibration_size=CALIBRATION_SIZE, variants=VARIANTS, bench=False,
                                              gate=GatePolicy(max_accuracy_drop_pp=100, min_agreement=0.0)))
                       for _ in range(2)]
            client = MlflowClient()
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))
            assert versions == [1, 2]
            assert client.get_model_version_by_alias(MODEL, "champion")
            variant_run_id = next(o.run_id for o in results[-1].outcomes if o.name == "pytorch-fx-int8")
            experiment_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
            variant = client.get_run(variant_run_id).data
        finally:
            while mlflow.active_run():
                mlflow.end_run()
            mlflow.set_tracking_uri(None)
    return UiStore(root, uri, experiment_id, [r.parent_run_id for r in results], variant_run_id,
                   dict(variant.params), dict(variant.metrics))


@pytest.fixture(scope="module")
def ui_server(ui_store) -> str:
    """`mlflow server` on the store (own process group, killed at teardown); yields its base URL."""
    root = ui_store.root
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", ui_store.backend_uri,
           "--default-artifact-root", str(root / "mlruns"), "--host", HOST, "--port", str(port), "--workers", "1"]
    log = root / "mlflow-server.log"
    process = start_in_own_group(cmd, root, env, log)
    url = f"http://{HOST}:{port}"
    try:
        wait_ready(url, process, log, SERVER_START_TIMEOUT, what="mlflow server")
        yield url
    finally:
        stop_process_groups([process])


# ---- browser ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    configured = os.environ.get("PTQFLOW_SCREENSHOTS")
    path = Path(configured) if configured else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ui_preferences(store: UiStore) -> dict[str, str]:
    """localStorage the UI reads at start-up: the "Model training" sidebar (not GenAI), the assistant panel closed,
    and in the runs table both sweeps expanded with a few metric and param columns wide enough for their names.
    Unknown keys are ignored by other MLflow versions; the tests check what is on the page, not these settings."""
    columns = {"metrics.`accuracy`": 100, "metrics.`top1_agreement`": 130, "metrics.`model_size_bytes`": 140,
               "params.`framework`": 130, "params.`weight_dtype`": 110}
    runs_table = {
        "runsExpanded": {run_id: True for run_id in store.parent_run_ids},
        "selectedColumns": list(columns),
        # Widths are applied only to the columns named in columnOrder, so that lists the whole table.
        "columnOrder": ["0", "attributes.`Run Name`", "runDateAndNestInfo", "duration", *columns],
        "columnWidths": columns,
    }
    return {
        "mlflow.workflowType_v1": json.dumps("machine_learning"),
        "mlflow.assistant.panelOpen_v1": "false",
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
        f'MLflowLocalStorage-1.1-ExperimentPage-["{store.experiment_id}"]-ReactComponentState': json.dumps(runs_table),
    }


@pytest.fixture(scope="module")
def page(ui_server, ui_store, tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT,
            base_url=ui_server)
        try:
            context.set_default_timeout(UI_TIMEOUT_MS)
            # Set once, before the app's own scripts run, and never over what the app wrote since.
            context.add_init_script(
                "(() => { const prefs = %s; for (const [k, v] of Object.entries(prefs)) "
                "{ if (localStorage.getItem(k) === null) localStorage.setItem(k, v); } })();"
                % json.dumps(_ui_preferences(ui_store)))
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()
    shutil.rmtree(profile, ignore_errors=True)


def _shoot(page: Page, directory: Path, name: str) -> Path:
    page.wait_for_timeout(500)  # let late layout (column widths, fonts) settle
    path = directory / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _row(page: Page, key: str):
    """The row of the run page's params or metrics table whose first cell is `key`."""
    return page.get_by_role("row").filter(has=page.get_by_role("cell", name=key, exact=True)).first


def _expect_image_loaded(page: Page, artifact_path: str) -> None:
    """The artifact viewer shows the PNG as <img alt="<artifact path>" src="blob:..."> once it is fetched."""
    image = page.locator(f'img[alt="{artifact_path}"]').first
    expect(image).to_be_visible()
    page.wait_for_function("alt => [...document.images].some(i => i.alt === alt && i.complete && i.naturalWidth > 0)",
                           arg=artifact_path)
    width = page.evaluate("alt => [...document.images].find(i => i.alt === alt).naturalWidth", artifact_path)
    assert width > 0


# ---- tests ------------------------------------------------------------------------------------------------------
def test_experiment_runs_table(page: Page, ui_store, screenshots):
    page.goto(f"/#/experiments/{ui_store.experiment_id}/runs")
    expect(page.get_by_text(EXPERIMENT).first).to_be_visible()
    expect(page.get_by_role("link", name="sweep-resnet8").first).to_be_visible()
    children = page.get_by_role("link", name="pytorch-fx-int8", exact=True)
    if not children.first.is_visible():  # the seeded expansion was not applied: open the sweeps by hand
        for toggle in page.locator('[role=gridcell][col-id="attributes.`Run Name`"] button').all():
            toggle.click()
    for name in ("pytorch-fx-int8", "ort-uint8", "fp32"):
        expect(page.get_by_role("link", name=name, exact=True).first).to_be_visible()
    assert page.get_by_role("link", name="sweep-resnet8").count() == 2
    assert page.get_by_role("link", name="pytorch-fx-int8", exact=True).count() == 2
    _shoot(page, screenshots, "experiment_runs")


def test_parent_run_plots(page: Page, ui_store, screenshots):
    from tracking.keys import Artifact

    parent = ui_store.parent_run_ids[-1]
    page.goto(f"/#/experiments/{ui_store.experiment_id}/runs/{parent}/artifacts/{Artifact.PLOT_ACCURACY_VS_SIZE}")
    expect(page.get_by_text("sweep-resnet8").first).to_be_visible()
    _expect_image_loaded(page, Artifact.PLOT_ACCURACY_VS_SIZE)
    _shoot(page, screenshots, "parent_run_accuracy_vs_size")

    # Another plot, opened from the artifact tree as a user would.
    page.get_by_text(Path(Artifact.PLOT_AGREEMENT).name, exact=True).first.click()
    _expect_image_loaded(page, Artifact.PLOT_AGREEMENT)
    _shoot(page, screenshots, "parent_run_top1_agreement")


def test_variant_run_params_and_metrics(page: Page, ui_store, screenshots):
    from tracking.keys import Metric, Param

    page.goto(f"/#/experiments/{ui_store.experiment_id}/runs/{ui_store.variant_run_id}")
    expect(page.get_by_text("pytorch-fx-int8").first).to_be_visible()
    expected = {Param.VARIANT: "pytorch-fx-int8", Param.WEIGHT_DTYPE: "int8",
                Param.CALIBRATION_SIZE: str(CALIBRATION_SIZE)}
    for key, value in expected.items():
        assert ui_store.variant_params[key] == value
        row = _row(page, key)
        row.scroll_into_view_if_needed()
        expect(row).to_be_visible()
        expect(row.get_by_role("cell").nth(1)).to_have_text(value)
    for key in (Metric.TOP1_AGREEMENT, Metric.ACCURACY):  # ends scrolled back to the metrics for the screenshot
        row = _row(page, key)
        row.scroll_into_view_if_needed()
        expect(row).to_be_visible()
        shown = row.get_by_role("cell").nth(1).inner_text().strip()
        assert float(shown) == pytest.approx(ui_store.variant_metrics[key], abs=5e-3), (key, shown)
    _shoot(page, screenshots, "variant_run")


def test_registered_model_versions_and_alias(page: Page, screenshots):
    page.goto(f"/#/models/{MODEL}")
    expect(page.get_by_role("heading", name=MODEL).first).to_be_visible()
    for version in ("Version 1", "Version 2"):
        expect(page.get_by_role("link", name=version, exact=True).first).to_be_visible()
    expect(page.get_by_text(re.compile(r"@\s*champion")).first).to_be_visible()
    _shoot(page, screenshots, "registered_model")
