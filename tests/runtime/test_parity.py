"""The comparator: structure first, NaN never equal, padded tokens ignored, all outputs reported."""

from __future__ import annotations

import numpy as np

from bert_compiler.runtime.parity import DEFAULT_TOLERANCES, OutputParity, compare_batch

FP32 = DEFAULT_TOLERANCES["fp32"]


def _random(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_identical_outputs_pass():
    entry = OutputParity("e")
    ref = _random((4, 8))
    entry.update(ref, ref.copy(), None)
    report = entry.report(FP32)
    assert report["passed"] and report["max_abs_err"] == 0 and report["min_cosine"] >= 0.99999


def test_small_noise_is_measured():
    entry = OutputParity("e")
    ref = _random((4, 8))
    entry.update(ref, ref + 1e-2, None)
    report = entry.report(FP32)
    assert not report["passed"]
    assert abs(report["max_abs_err"] - 1e-2) < 1e-6
    assert any("max_abs_err" in f for f in report["failures"])


def test_nan_never_passes():
    entry = OutputParity("e")
    ref = _random((2, 4))
    cand = ref.copy()
    cand[0, 0] = np.nan
    entry.update(ref, cand, None)
    assert "1 NaN/Inf values" in entry.failures(FP32)


def test_shape_and_dtype_mismatch_fail_without_broadcasting():
    entry = OutputParity("e")
    ref = _random((2, 4))
    entry.update(ref, ref[:1], None)
    entry.update(ref, ref.astype(np.float16), None)
    failures = entry.failures(FP32)
    assert any("shape" in f for f in failures) and any("dtype" in f for f in failures)


def test_padded_positions_are_excluded_for_token_outputs():
    entry = OutputParity("h")
    ref = _random((2, 3, 4))
    cand = ref.copy()
    cand[1, 2] = 1000.0  # a padded position
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    entry.update(ref, cand, mask)
    assert entry.report(FP32)["passed"]
    cand[1, 1] = 1000.0  # a real token
    entry.update(ref, cand, mask)
    assert not entry.report(FP32)["passed"]


def test_opposite_vectors_have_cosine_minus_one():
    entry = OutputParity("e")
    ref = _random((1, 8))
    entry.update(ref, -ref, None)
    assert entry.min_cosine < -0.999


def test_outputs_match_by_name_and_extra_or_missing_outputs_fail():
    parity = {}
    ref = {"a": _random((2, 2)), "b": _random((2, 2), seed=1)}
    compare_batch(parity, ref, {"b": ref["b"], "a": ref["a"], "c": ref["a"]}, None)
    compare_batch(parity, ref, {"a": ref["a"]}, None)
    assert parity["a"].report(FP32)["passed"]
    assert "missing from the engine's outputs" in parity["b"].failures(FP32)
    assert parity["c"].failures(FP32) == ["engine output has no PyTorch counterpart"]


def test_nothing_compared_is_a_failure():
    assert OutputParity("e").failures(FP32) == ["nothing was compared"]


def test_relative_l2_past_its_limit_fails_alone():
    """Small outputs 1% off: under max_abs_err, cosine exactly 1, and rel_l2_err 1e-2 against
    fp32's 1e-4: only the relative L2 limit catches it."""
    entry = OutputParity("e")
    ref = _random((4, 8)) * 1e-2
    entry.update(ref, ref * np.float32(1.01), None)
    report = entry.report(FP32)
    assert report["max_abs_err"] < FP32.max_abs_err and report["min_cosine"] > FP32.min_cosine
    assert abs(report["rel_l2_err"] - 1e-2) < 1e-4
    assert report["failures"] == [f"rel_l2_err {report['rel_l2_err']:.3g} > {FP32.rel_l2_err:g}"]
