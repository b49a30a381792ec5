"""The run summary's typed results written as the JSON run.json and `run --json` document."""

from __future__ import annotations

from pathlib import Path

from bert_compiler.run_summary import EngineReport, VerifySpeed
from bert_compiler.stages.verify import Metric, ParitySummary


def _engine(speed: VerifySpeed | None) -> EngineReport:
    return EngineReport(
        backend="onnxruntime", precision="fp32", device="cpu", compute_capability=None,
        name="ort-cpu-fp32", path=Path("e/model.onnx"), manifest=Path("e/manifest.json"),
        report=Path("v/report.json"), parity=ParitySummary(None, None, None, False),
        metric=Metric("sst2_accuracy", None), passed=False, failures=("no rows",),
        float_ops=None, speed=speed,
    )  # fmt: skip


def test_a_verify_that_timed_nothing_writes_the_empty_speed_it_recorded():
    """verify records speed {} where its metric pass ran no embedding (a classifier of other
    than two labels): the summary writes {} as before, and the line leaves speed out."""
    assert VerifySpeed.of({}) is None and VerifySpeed.of(None) is None
    untimed = _engine(None)
    assert untimed.to_json()["speed"] == {}
    assert "speed" not in untimed.lines(None) and "parity min_cosine=nan" in untimed.lines(None)
    timed = _engine(VerifySpeed(120.0, 240, "rough"))
    speed = {"sentences_per_s": 120.0, "sentences": 240, "measured": "rough"}
    assert timed.to_json()["speed"] == speed
    assert "120 sentences/s over 240" in timed.lines(Metric("sst2_accuracy", 0.5))
