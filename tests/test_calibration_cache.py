"""onnxruntime calibration ranges kept between quantizations (quantize_static's calibration_cache_path): the
same bytes as a fresh calibration, shared by configs that differ only in types, and keyed by every input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_fixture import tiny_cnn

from ptqflow.models.backends.base import FloatModel, cache_root
from ptqflow.models.graph.onnx_model import load_classifier
from ptqflow.models.backends.ort import OrtStaticConfig, calibration_cache_path, quantize

RNG = np.random.default_rng(3)
INT8 = OrtStaticConfig(quant_format="QDQ", activation_dtype="int8", weight_dtype="int8", per_channel=True,
                       weight_rounding="nearest")
U8S8 = OrtStaticConfig(quant_format="QOperator", activation_dtype="uint8", weight_dtype="int8", per_channel=True,
                       weight_rounding="nearest")


@pytest.fixture
def float_model(tmp_path, monkeypatch) -> FloatModel:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), str(path))
    return FloatModel(load_classifier(path), tmp_path / "work")


def _images(n: int) -> np.ndarray:
    return RNG.uniform(0, 255, (n, 32, 32, 3)).astype(np.float32)


def _cached() -> list[Path]:
    return sorted((cache_root() / "calibration").glob("*.json"))


def test_cached_ranges_give_the_same_model_bytes_and_count_the_images(float_model, tmp_path):
    images, advanced = _images(40), []
    first = quantize(float_model, INT8, images, tmp_path / "first", advanced.append)
    assert len(_cached()) == 1 and sum(advanced) == 40
    again = quantize(float_model, INT8, images, tmp_path / "again", advanced.append)
    assert again.path.read_bytes() == first.path.read_bytes()
    assert again.calibration_images == first.calibration_images == 40 and sum(advanced) == 80
    # QOperator with uint8 activations reads the same FP32 ranges: no second calibration
    quantize(float_model, U8S8, images, tmp_path / "u8s8")
    assert len(_cached()) == 1


def test_a_cache_hit_matches_a_fresh_calibration(float_model, tmp_path, monkeypatch):
    images = _images(40)
    quantize(float_model, U8S8, images, tmp_path / "warm")  # fills the cache
    from_cache = quantize(float_model, U8S8, images, tmp_path / "hit")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    fresh = quantize(float_model, U8S8, images, tmp_path / "fresh")
    assert from_cache.path.read_bytes() == fresh.path.read_bytes()


def test_the_key_covers_images_batching_method_and_options(float_model):
    float_model = float_model.ready_for(INT8)
    ready, images = float_model.ort_ready_path, _images(40)
    key = calibration_cache_path(ready, images, 20, INT8)
    assert key == calibration_cache_path(ready, images.copy(), 20, U8S8)  # types do not shape the ranges
    changed = images.copy()
    changed[0, 0, 0, 0] += 1
    others = {calibration_cache_path(ready, changed, 20, INT8), calibration_cache_path(ready, images, 10, INT8),
              calibration_cache_path(ready, images, 20, OrtStaticConfig(calibration_method="MinMax",
                                                                         extra_options=())),
              calibration_cache_path(ready, images, 20, OrtStaticConfig(extra_options=(("CalibPercentile", 99.9),)))}
    assert key not in others and len(others) == 4


def test_an_unreadable_cache_file_is_recomputed(float_model, tmp_path):
    images = _images(40)
    first = quantize(float_model, INT8, images, tmp_path / "first")
    (cached,) = _cached()
    cached.write_text("{not json")
    again = quantize(float_model, INT8, images, tmp_path / "again")
    assert again.path.read_bytes() == first.path.read_bytes() and again.calibration_images == 40
    assert _cached() == [cached] and cached.read_text().startswith("{")


@pytest.mark.parametrize("method", ["Percentile", "Entropy"])
def test_calibrator_speedups_give_the_same_model_bytes(float_model, tmp_path, monkeypatch, method):
    """Histograms made on several threads, and the calibrator's outputs copied out of onnxruntime's buffers
    (ptqflow.models.backends.ort_calibration), give the model that onnxruntime's calibrator alone gives."""
    import threading

    from onnxruntime.quantization.calibrate import HistogramCollector

    import ptqflow.models.backends.ort as quantize_ort
    from ptqflow.models.backends import ort_calibration
    import ptqflow.models.runtime.runners

    config = OrtStaticConfig(quant_format="QDQ", activation_dtype="uint8", weight_dtype="int8", per_channel=True,
                             weight_rounding="nearest", calibration_method=method,
                             extra_options=(("CalibPercentile", 99.99),) if method == "Percentile" else ())
    images = _images(40)
    monkeypatch.setattr(ptqflow.models.runtime.runners, "cpu_threads", lambda: 2)  # threads even on a 1-core machine
    threads = set()
    original = HistogramCollector.collect

    def recording(self, name_to_arr):
        threads.add(threading.get_ident())
        return original(self, name_to_arr)

    monkeypatch.setattr(HistogramCollector, "collect", recording)
    copied = []
    original_run = ort_calibration._CopyingSession.run
    monkeypatch.setattr(ort_calibration._CopyingSession, "run",
                        lambda self, *args, **kwargs: copied.append(1) or original_run(self, *args, **kwargs))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-parallel"))
    parallel = quantize(float_model, config, images, tmp_path / "parallel").path.read_bytes()
    assert threads and threading.get_ident() not in threads  # onnxruntime's collect ran on the pool's threads
    assert HistogramCollector.collect is recording  # put back afterwards
    assert copied  # the calibrator ran through the copying session

    monkeypatch.setattr(quantize_ort, "calibrator_speedups", __import__("contextlib").nullcontext)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-serial"))
    assert quantize(float_model, config, images, tmp_path / "serial").path.read_bytes() == parallel
