"""The diagnosis as people read it (issue 24, "readable diagnosis"): exporters' 200-character scoped names become
short unique ones in tables and hints, and dead channels (ReLU units that never fire) no longer make the input-range
ratio infinite."""

from __future__ import annotations

import math

import numpy as np

from ptqflow.models.diagnosis.activations import ChannelRange
from ptqflow.models.diagnosis.records import MAX_SHORT_NAME, LayerDiagnosis, hint_for, short_names


def test_short_names_are_the_shortest_unique_ends_of_exporter_scopes():
    scope = "StatefulPartitionedCall/sequential/mobilenet_0.25_96;" * 3
    names = [f"{scope}block_{i}/depthwise/Conv" for i in range(12)] + [f"{scope}block_3/pointwise/Conv", "logits"]
    short = short_names(names)
    assert short[names[0]] == "block_0/depthwise/Conv"
    assert short[names[3]] == "block_3/depthwise/Conv" and short[names[12]] == "pointwise/Conv"
    assert short["logits"] == "logits"
    assert len(set(short.values())) == len(names)
    assert max(len(text) for text in short.values()) <= MAX_SHORT_NAME


def test_names_that_only_differ_far_from_their_end_stay_whole_rather_than_collide():
    long_tail = "x" * 60
    names = [f"a/{long_tail}", f"b/{long_tail}"]
    assert short_names(names) == {name: name for name in names}


def test_dead_channels_are_left_out_of_the_median_range():
    ranges = ChannelRange()
    values = np.array([0.0, 0.0, 0.0, 0.0, 1.0, 1.2, 1.1, 20.0])  # four channels never fire
    ranges.add(values.reshape(1, -1, 1, 1) * np.ones((2, 1, 3, 3)), axis=1)
    ratio, channel = ranges.outlier()
    assert channel == 7 and math.isfinite(ratio) and ratio == 20.0 / 1.15
    one_live = ChannelRange()
    one_live.add(np.array([0.0, 0.0, 5.0]).reshape(1, -1), axis=1)
    assert one_live.outlier() == (None, None)


def test_hints_name_tensors_by_their_short_names():
    full = "StatefulPartitionedCall/" * 8 + "block_9/relu6"
    row = LayerDiagnosis("conv", "Conv", 0.1, 45.0, 10.0, 9.0, True, full, "out", input_range_ratio=30.0,
                         outlier_channel=2)
    hint = hint_for(row, lambda name: short_names([name, "other/relu6"])[name])
    assert "block_9/relu6 channel 2" in hint and "StatefulPartitionedCall" not in hint
