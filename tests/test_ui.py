"""The MLflow UI shows what a sweep records: headless Chromium (driven by Playwright) against `mlflow server`.

Two identical sweeps go into a fresh temp sqlite store (so `resnet8-int8` has version 1, @champion, and version 2, a
rejected re-run), `mlflow server` serves that store on a free 127.0.0.1 port, and a browser with a fresh profile
opens the experiment by the link the sweep prints: the "Model training" view with ptqflow's metric columns, the
Models tab with every variant's logged model and its metrics, the parent run's plots, a variant run's params and
metrics, and the registered model with each version's gate decision.

With ../shared present the sweeps are the real ResNet8 (../shared/models/resnet8.onnx, 1,000 test images, every
default variant, benchmarks on, the default gate; AdaRound comes from the user's cache, ~/.cache/ptqflow/adaround,
so only the first run pays for it), and the README's screenshots in docs/screenshots are replaced by this run's.
Without it the tiny fixture model is swept and the README's screenshots are left alone. $PTQFLOW_SCREENSHOTS, when
set, receives every screenshot instead (default for the others: a pytest temp dir); PTQFLOW_UI_SWEEP=tiny sweeps
the tiny fixture even when ../shared exists.

Needs Debian's `chromium` (/usr/bin/chromium) and the `playwright` package used only as a driver (Playwright's own
browser download is never used); `bash .ci/browser.sh` installs both. Skipped, with the reason, when either is
missing.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ADAROUND_ITERATIONS, CALIBRATION_SIZE, SHARED_DATA, SHARED_MODEL
from processes import HOST, free_port, start_in_own_group, stop_process_groups, wait_ready

pytestmark = pytest.mark.ui

CHROMIUM = Path(os.environ.get("PTQFLOW_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1850, "height": 1000}  # the sidebar and the runs table with ptqflow's columns (1,600 px)
CHARTS_VIEWPORT = {"width": 1850, "height": 2150}  # the Models tab's charts: accuracy down to latency
REGISTRY_VIEWPORT = {"width": 1850, "height": 1450}  # both versions with their tags (the newest is listed first)
EXPERIMENT = "resnet8-quantization"
MODEL = "resnet8-int8"
# Sweep the real ResNet8 for the README's screenshots (PTQFLOW_UI_SWEEP=tiny: the tiny fixture even then).
REAL = SHARED_MODEL.is_file() and SHARED_DATA.is_dir() and os.environ.get("PTQFLOW_UI_SWEEP") != "tiny"
REAL_TEST_LIMIT = 1000
TINY_VARIANTS = ("pytorch-fx-int8", "ort-uint8")  # plus fp32, always run as the reference
README_SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
RUN_NAME = re.compile(r"^resnet8 · \d{4}-\d\d-\d\d \d\d:\d\d:\d\d · \d+ imgs$")
# What the runs table shows with ptqflow's saved view, and what the Models tab compares.
RUNS_COLUMNS = ("Models", "accuracy", "accuracy_delta_pp", "top1_agreement", "latency_ms_b1_p50", "model_size_bytes",
                "weight_dtype")
MODEL_METRICS = ("accuracy", "accuracy_delta_pp", "top1_agreement", "model_size_bytes", "latency_ms_b1_p50")
GENAI_ONLY = ("Evaluation runs", "Judges", "Prompts", "Training runs")  # the GenAI view's sidebar entries
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

expect.set_options(timeout=UI_TIMEOUT_MS)  # assertions wait as long as actions: the first paint is slow on 2 cores


# ---- store and server -------------------------------------------------------------------------------------------
@dataclass
class UiStore:
    root: Path
    backend_uri: str
    experiment_id: str
    parent_run_ids: list[str]  # oldest first
    run_names: list[str]  # of the parent runs, oldest first
    variant_run_id: str  # pytorch-fx-int8 of the latest sweep
    variant_params: dict[str, str]
    variant_metrics: dict[str, float]
    ok_variants: tuple[str, ...]  # the variants (fp32 included) that logged a model in each sweep
    logged_models: dict[str, dict]  # model id -> {"name": ..., "metrics": {...}}
    rejected_description: str  # of resnet8-int8 version 2


@pytest.fixture(scope="module")
def ui_store(tmp_path_factory, request) -> UiStore:
    """The same sweep twice: resnet8-int8 version 1 takes @champion, version 2 (a re-run) is rejected."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from ptqflow.pipelines.registry.gate import GatePolicy
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep

    if REAL:
        # --allow-slower: on a small VM the PyTorch int8 ResNet8 runs slower than onnxruntime FP32 at batch 1, and
        # the pages shown are those of resnet8-int8's champion
        options = SweepOptions(model_path=SHARED_MODEL, data_dir=SHARED_DATA, test_limit=REAL_TEST_LIMIT,
                               gate=GatePolicy(allow_slower=True))
    else:  # the tiny model agrees with its FP32 self on few images: a gate anything passes
        options = SweepOptions(model_path=request.getfixturevalue("tiny_model"),
                               data_dir=request.getfixturevalue("cifar_dir"), calibration_size=CALIBRATION_SIZE,
                               adaround_iterations=ADAROUND_ITERATIONS, variants=TINY_VARIANTS,
                               gate=GatePolicy(max_accuracy_drop_pp=100, min_agreement=0.0, allow_slower=True))
    root = tmp_path_factory.mktemp("ui_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)  # artifacts go to ./mlruns in the temp dir
        if REAL:  # ptqflow's own AdaRound cache, not the suite's throw-away one: computed once per machine
            mp.setenv("XDG_CACHE_HOME", str(Path.home() / ".cache"))
        mlflow.set_tracking_uri(uri)
        try:
            results = [run_sweep(options) for _ in range(2)]
            client = MlflowClient()
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))
            assert versions == [1, 2]
            assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
            rejected = client.get_model_version(MODEL, "2")
            assert rejected.tags["promotion_decision"] == "rejected", rejected.tags
            variant_run_id = next(o.run_id for o in results[-1].outcomes if o.name == "pytorch-fx-int8")
            experiment_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
            variant = client.get_run(variant_run_id).data
            run_names = [client.get_run(r.parent_run_id).info.run_name for r in results]
            logged_models = {m.model_id: {"name": m.name, "metrics": {x.key: x.value for x in m.metrics}}
                             for m in client.search_logged_models([experiment_id], max_results=100)}
        finally:
            while mlflow.active_run():
                mlflow.end_run()
            mlflow.set_tracking_uri(None)
    ok_variants = tuple(o.name for o in results[-1].outcomes if o.status == "ok")
    return UiStore(root, uri, experiment_id, [r.parent_run_id for r in results], run_names, variant_run_id,
                   dict(variant.params), dict(variant.metrics), ok_variants, logged_models, rejected.description)


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
@dataclass
class Screenshots:
    readme: Path  # the README's screenshots: docs/screenshots after a real sweep
    other: Path


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Screenshots:
    configured = os.environ.get("PTQFLOW_SCREENSHOTS")
    other = Path(configured) if configured else tmp_path_factory.mktemp("screenshots")
    readme = other if configured or not REAL else README_SCREENSHOTS
    for path in (readme, other):
        path.mkdir(parents=True, exist_ok=True)
    return Screenshots(readme, other)


def _ui_preferences() -> dict[str, str]:
    """localStorage the UI reads at start-up: only the assistant panel closed (it would cover a third of every
    screenshot). The view ("Model training") and the runs table's columns come from what ptqflow recorded and the
    link it prints, not from browser settings."""
    return {
        "mlflow.assistant.panelOpen_v1": "false",
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
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
                % json.dumps(_ui_preferences()))
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
ML = "workflowType=machine_learning"  # the "Model training" view, as in the links ptqflow prints


def _expect_model_training_view(page: Page) -> None:
    """The experiment sidebar of MLflow's "Model training" view (Runs, Models), not the GenAI one."""
    assert ML in page.url, page.url
    expect(page.get_by_text("Models", exact=True).first).to_be_visible()
    for entry in GENAI_ONLY:
        expect(page.get_by_text(entry, exact=True)).to_have_count(0)


def _run_name_links(page: Page, name: str):
    return page.locator('[role=gridcell][col-id="attributes.`Run Name`"]').get_by_role("link", name=name, exact=True)


def _cell(page: Page, inside_row, col_id: str):
    """The cell in column `col_id` of the grid row that holds `inside_row` (pinned and scrolled columns live in
    separate row elements that share a row-index)."""
    index = inside_row.evaluate("e => e.closest('[row-index]').getAttribute('row-index')")
    return page.locator(f"[role=row][row-index='{index}'] [col-id='{col_id}']").first


def _model_metric(page: Page, model_id: str, key: str) -> str:
    """The text of metric `key` in the Models tab's row of logged model `model_id` (its grid row id). The grid's
    column ids quote the metric key as JSON, HTML-escaped in MLflow 3.17."""
    cells = page.locator(f'[role=row][row-id="{model_id}"] [role=gridcell]')
    expect(cells.first).to_be_attached()
    wanted = "metrics." + json.dumps({"metricKey": key}, separators=(",", ":"))
    for cell in cells.all():
        if html.unescape(cell.get_attribute("col-id") or "") == wanted:
            return cell.inner_text().strip()
    raise AssertionError(f"no {key} column in the row of {model_id}")


def test_experiment_opens_on_model_training_with_metric_columns(page: Page, ui_store, screenshots):
    from ptqflow.tracking import experiments

    # The link the sweep prints, opened in a fresh browser profile on a fresh store.
    route = experiments.experiment_route(ui_store.experiment_id)
    assert experiments.experiment_page(ui_store.experiment_id).endswith(f"#{route}")
    page.goto(f"/#{route}")
    expect(page.get_by_text(EXPERIMENT).first).to_be_visible()
    _expect_model_training_view(page)
    for header in RUNS_COLUMNS:  # ptqflow's saved view: its metric and param columns, not just Source/Dataset
        expect(page.get_by_role("columnheader", name=header, exact=True).first).to_be_visible()
    # Two sweeps of the same model, told apart by their names (model, start time, test images).
    assert ui_store.run_names[0] != ui_store.run_names[1]
    for name in ui_store.run_names:
        assert RUN_NAME.match(name), name
        expect(_run_name_links(page, name)).to_have_count(1)
    for toggle in page.locator('[role=gridcell][col-id="attributes.`Run Name`"] button').all():
        toggle.click()  # expand both sweeps
    for name in ui_store.ok_variants:
        expect(_run_name_links(page, name)).to_have_count(2)
    # The Models column links every variant run to its logged model (or, once registered, its version).
    models = page.locator('[role=gridcell][col-id="attributes.`Models`"]')
    expect(models.locator('a[href*="/models/m-"]').first).to_be_visible()
    filled = [text for text in models.all_inner_texts() if text.strip() not in ("", "-")]
    assert len(filled) == 2 * len(ui_store.ok_variants), filled
    # A variant row shows its accuracy as logged.
    link = _run_name_links(page, "pytorch-fx-int8").first
    shown = _cell(page, link, "metrics.`accuracy`").inner_text().strip()
    assert float(shown) == pytest.approx(ui_store.variant_metrics["accuracy"], abs=5e-3), shown
    _shoot(page, screenshots.readme, "experiment_runs")


def test_models_tab_lists_every_variants_logged_model_with_metrics(page: Page, ui_store, screenshots):
    from ptqflow.tracking import experiments

    page.goto(f"/#{experiments.experiment_route(ui_store.experiment_id, 'models')}")
    links = page.locator('a[href*="/models/m-"]')
    expect(links.first).to_be_visible()
    _expect_model_training_view(page)
    expected = sorted(ui_store.ok_variants * 2)  # two sweeps, one logged model per variant that ran
    assert sorted(m["name"] for m in ui_store.logged_models.values()) == expected
    expect(links).to_have_count(len(expected))
    assert sorted(links.all_inner_texts()) == expected
    for header in ("accuracy", "accuracy_delta_pp", "top1_agreement"):
        expect(page.get_by_role("columnheader", name=header, exact=True).first).to_be_visible()
    for model_id, model in ui_store.logged_models.items():  # each model's row shows its own logged numbers
        for key in ("accuracy", "top1_agreement"):
            shown = _model_metric(page, model_id, key)
            assert float(shown) == pytest.approx(model["metrics"][key], abs=5e-3), (model["name"], key, shown)
        assert set(MODEL_METRICS) <= set(model["metrics"]), (model["name"], sorted(model["metrics"]))
    _shoot(page, screenshots.readme, "experiment_models")

    # The chart view compares the models metric by metric, accuracy first.
    page.set_viewport_size(CHARTS_VIEWPORT)
    try:
        page.locator("[data-component-id='mlflow.logged_model.list.view-mode'] label").nth(1).click()
        for key in MODEL_METRICS:
            expect(page.get_by_text(key, exact=True).first).to_be_visible()
        page.wait_for_timeout(2000)  # the bars animate in
        _shoot(page, screenshots.readme, "experiment_models_charts")
    finally:
        page.set_viewport_size(VIEWPORT)


def test_parent_run_plots(page: Page, ui_store, screenshots):
    from ptqflow.tracking.keys import Artifact

    parent = ui_store.parent_run_ids[-1]
    page.goto(f"/#/experiments/{ui_store.experiment_id}/runs/{parent}/artifacts/{Artifact.PLOT_ACCURACY_VS_SIZE}"
              f"?{ML}")
    expect(page.get_by_text(ui_store.run_names[-1]).first).to_be_visible()
    _expect_image_loaded(page, Artifact.PLOT_ACCURACY_VS_SIZE)
    _shoot(page, screenshots.other, "parent_run_accuracy_vs_size")

    # Another plot, opened from the artifact tree as a user would.
    page.get_by_text(Path(Artifact.PLOT_AGREEMENT).name, exact=True).first.click()
    _expect_image_loaded(page, Artifact.PLOT_AGREEMENT)
    _shoot(page, screenshots.other, "parent_run_top1_agreement")


def test_variant_run_params_metrics_and_logged_model(page: Page, ui_store, screenshots):
    from ptqflow.tracking.keys import Metric, Param

    page.goto(f"/#/experiments/{ui_store.experiment_id}/runs/{ui_store.variant_run_id}?{ML}")
    expect(page.get_by_text("pytorch-fx-int8").first).to_be_visible()
    expected = {Param.VARIANT: "pytorch-fx-int8", Param.WEIGHT_DTYPE: "int8",
                Param.CALIBRATION_SIZE: ui_store.variant_params[Param.CALIBRATION_SIZE]}
    assert expected[Param.CALIBRATION_SIZE] == str(1000 if REAL else CALIBRATION_SIZE)
    for key, value in expected.items():
        assert ui_store.variant_params[key] == value
        row = _row(page, key)
        row.scroll_into_view_if_needed()
        expect(row).to_be_visible()
        expect(row.get_by_role("cell").nth(1)).to_have_text(value)
    # The run page links the logged model (and its registered version).
    expect(page.locator('a[href*="/models/m-"]').first).to_be_attached()
    for key in (Metric.TOP1_AGREEMENT, Metric.ACCURACY):  # ends scrolled back to the metrics for the screenshot
        row = _row(page, key)
        row.scroll_into_view_if_needed()
        expect(row).to_be_visible()
        shown = row.get_by_role("cell").nth(1).inner_text().strip()
        assert float(shown) == pytest.approx(ui_store.variant_metrics[key], abs=5e-3), (key, shown)
    _shoot(page, screenshots.other, "variant_run")


def test_registered_model_versions_say_what_the_gate_decided(page: Page, ui_store, screenshots):
    page.goto(f"/#/models/{MODEL}?{ML}")
    expect(page.get_by_role("heading", name=MODEL).first).to_be_visible()
    for version in ("Version 1", "Version 2"):
        expect(page.get_by_role("link", name=version, exact=True).first).to_be_visible()
    expect(page.get_by_text(re.compile(r"@\s*champion")).first).to_be_visible()
    # The version list's description column opens with the decision (the UI cuts it after 30-odd characters).
    expect(page.get_by_text(re.compile(r"^Rejected: same inputs as")).first).to_be_visible()
    expect(page.get_by_text(re.compile(r"^Promoted to @champion: ")).first).to_be_visible()
    page.set_viewport_size(REGISTRY_VIEWPORT)
    try:
        _shoot(page, screenshots.readme, "registered_model")
    finally:
        page.set_viewport_size(VIEWPORT)

    # The version page: the whole decision sentence, and the logged model it was registered from.
    decision = ui_store.rejected_description.split("\n\n")[0]
    assert decision.startswith("Rejected: same inputs as champion v1") and "Gate:" in decision
    page.goto(f"/#/models/{MODEL}/versions/2?{ML}")
    expect(page.get_by_text(decision.split(" Gate:")[0], exact=False).first).to_be_visible()
    expect(page.locator('a[href*="/models/m-"]').first).to_be_visible()
    _shoot(page, screenshots.readme, "model_version")
