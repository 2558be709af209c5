"""Shared fixtures: a tiny CIFAR-format dataset, a tiny NHWC ONNX CNN, a throw-away MLflow sqlite store, and one
completed sweep that many read-only tests inspect."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from pathlib import Path

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
# AdaRound results are cached under $XDG_CACHE_HOME/ptqflow: keep the suite's cache its own and throw-away.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ptqflow-test-cache-")

from cifar_fixture import write_cifar_dir  # noqa: E402
import numpy as np  # noqa: E402
from onnx_fixture import fit_dense_head, tiny_cnn  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_MODEL = SHARED / "models" / "resnet8.onnx"
SHARED_DATA = SHARED / "data" / "cifar-10-batches-py"

# Tiny data: 20 training images per class (calibration 100 = 10 per class), 10 test images per class.
CALIBRATION_SIZE = 100
# The default recipe (AdaRound) with few steps: the code path is the real one, the tiny model needs no more.
ADAROUND_ITERATIONS = 20


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    return write_cifar_dir(tmp_path_factory.mktemp("data") / "cifar-10-batches-py", train_per_class=20,
                           test_per_class=10)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, cifar_dir) -> Path:
    """The tiny NHWC CNN with its dense head fitted to the fixture's training images. Named like the default model,
    so its registered names are the default ones (resnet8-int8, resnet8-int8-onnx)."""
    import onnx

    from ptqflow.pipelines.data.cifar import load_cifar10

    train = load_cifar10(cifar_dir).train
    model = fit_dense_head(tiny_cnn(), train.images.transpose(0, 2, 3, 1).astype(np.float32), train.labels)
    path = tmp_path_factory.mktemp("models") / "resnet8.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture
def tiny_float_model(tmp_path):
    """tiny_cnn as the backends quantize it (ptqflow.models.backends.base.FloatModel.for_quantization)."""
    import onnx

    from ptqflow.models.backends.base import FloatModel
    from ptqflow.models.graph.onnx_model import load_classifier

    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), str(path))
    return FloatModel.for_runtimes(load_classifier(path), tmp_path / "work").for_quantization()


@functools.cache
def _migrated_store() -> Path:
    """The directory of an empty MLflow sqlite store that MLflow created and migrated, once per test session."""
    from mlflow.tracking import MlflowClient

    made = Path(tempfile.mkdtemp(prefix="ptqflow-test-store-"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(made)  # MLflow resolves the Default experiment's ./mlruns against the working directory
        MlflowClient(f"sqlite:///{made / 'mlflow.db'}").search_experiments()
    return made


def seed_mlflow_store(root: Path) -> Path:
    """root/mlflow.db as a new MLflow sqlite store: a copy of _migrated_store's, with its Default experiment's
    artifact location moved to root/mlruns/0, as MLflow would have written it there. MLflow's schema migrations take
    1-1.5 s per new store on two cores; the store each test gets is still a real, empty MLflow store of its own."""
    import shutil
    import sqlite3

    db = root / "mlflow.db"
    if db.exists():
        return db
    made = _migrated_store()
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(made / "mlflow.db", db)
    with contextlib.closing(sqlite3.connect(db)) as connection, connection:
        connection.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)",
                           (str(made), str(root)))
    return db


def _point_mlflow_at(mp: pytest.MonkeyPatch, root: Path, seed: bool = True) -> str:
    uri = f"sqlite:///{seed_mlflow_store(root) if seed else root / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.chdir(root)  # the default artifact root (./mlruns) lands in the temp dir too
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


def _tracking_at(root: Path, seed: bool):
    with pytest.MonkeyPatch.context() as mp:
        _point_mlflow_at(mp, root, seed)
        yield root
        import mlflow

        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)


@pytest.fixture()
def tracking_store(tmp_path) -> Path:
    """A new, empty sqlite MLflow store in a temp dir, active for this test only."""
    yield from _tracking_at(tmp_path, seed=True)


@pytest.fixture()
def untouched_tracking_dir(tmp_path) -> Path:
    """MLflow pointed at a sqlite store in a temp dir that does not exist yet (as in a user's new working
    directory), for tests that check what creates one."""
    yield from _tracking_at(tmp_path, seed=False)


@pytest.fixture(scope="module")
def completed_sweep(tmp_path_factory, cifar_dir, tiny_model):
    """One default sweep on the tiny fixtures, in its own store; yields (result, store_dir)."""
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep

    root = tmp_path_factory.mktemp("sweep_store")
    with pytest.MonkeyPatch.context() as mp:
        _point_mlflow_at(mp, root)
        result = run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir,
                                        calibration_size=CALIBRATION_SIZE, adaround_iterations=ADAROUND_ITERATIONS))
        yield result, root
        import mlflow

        mlflow.set_tracking_uri(None)


def runs_by_name(experiment: str | None = None) -> dict:
    """The runs of `experiment` by name; by default of every experiment (a sweep's default experiment is named after
    its model file: `<stem>-quantization`)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    ids = ([mlflow.get_experiment_by_name(experiment).experiment_id] if experiment is not None
           else [e.experiment_id for e in client.search_experiments()])
    runs = client.search_runs(ids, max_results=1000)
    return {r.info.run_name: r for r in runs}


def all_runs() -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id], max_results=1000)]


def version_reason(name: str, version: str) -> str:
    """The gate's reason for a registered version, as ptqflow records it (the description's decision sentence)."""
    from mlflow.tracking import MlflowClient

    from ptqflow.tracking.aliases import recorded_reason

    mv = MlflowClient().get_model_version(name, version)
    return recorded_reason(dict(mv.tags), mv.description) or ""


def tiny_runner(tmp_path: Path, name: str, images: int = 300, preprocessing=None):
    """A VariantRunner (no benchmark, no diagnosis) of tiny_cnn on `images` random 32x32 test images (NHWC, raw
    pixels unless `preprocessing`), its work in tmp_path / name."""
    from types import SimpleNamespace

    import onnx

    from ptqflow.models.graph.onnx_model import load_classifier
    from ptqflow.pipelines.data.dataset import Dataset, Split
    from ptqflow.pipelines.data.preprocessing import InputTransform, Preprocessing
    from ptqflow.pipelines.variants.runner import RunnerOptions, VariantRunner

    if not (tmp_path / "tiny.onnx").exists():
        onnx.save(tiny_cnn(), str(tmp_path / "tiny.onnx"))
    rng = np.random.default_rng(0)
    test = Split(rng.integers(0, 256, (images, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, images))
    data = Dataset(test, test, tuple(f"c{i}" for i in range(10)), "digest", tmp_path)
    inputs = SimpleNamespace(data=data, model=load_classifier(tmp_path / "tiny.onnx"), test=test,
                             transform=InputTransform("NHWC", preprocessing or Preprocessing.raw), calibration=None,
                             calibration_digest="")
    return VariantRunner(inputs, tmp_path / name, RunnerOptions(bench=False, diagnose_images=0))
