"""`inferscope status` draws the p95 of each model over the period as a sparkline, from the recorder."""

from __future__ import annotations

import json

from inferscope.cli import main
from inferscope.cli.status import sparkline

from .conftest import run_python

SERVICE = """
import time, inferscope
inferscope.configure(window_seconds=1, metrics_exporters=[])

@inferscope.track_inference(model="trend")
def predict(pause):
    time.sleep(pause)

for pause in (0.001, 0.012):
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        predict(pause)
inferscope.shutdown()
"""


def test_the_sparkline_follows_the_recorded_p95(tmp_path, capsys):
    path = tmp_path / "recorder.sqlite"
    result = run_python(SERVICE, env={"INFERSCOPE_RECORDER": str(path)})
    assert result.returncode == 0, result.stderr

    assert main(["status", "--recorder", str(path), "--last", "3600", "--json"]) == 0
    (model,) = json.loads(capsys.readouterr().out)["models"]
    trend = [v for v in model["p95_trend_ms"] if v is not None]
    assert len(trend) >= 3  # about 5 one-second windows, each its own point
    # A call sleeps at least its pause: the last point holds only 12 ms calls, the first only 1 ms.
    assert trend[-1] >= 12.0
    assert trend[0] >= 1.0 and trend[0] < trend[-1]

    assert main(["status", "--recorder", str(path), "--last", "3600"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "p95 trend:" in line)
    bars = line.split("p95 trend: ")[1].split("  (")[0]
    assert bars == sparkline(model["p95_trend_ms"]) and len(bars) == len(model["p95_trend_ms"])


def test_sparkline_scales_between_the_extremes_and_keeps_gaps():
    assert sparkline([1.0, None, 8.0, 4.0]) == "▁ █▄"  # (4 - 1) / 7 of the way: the 4th bar
    assert sparkline([2.0, 2.0]) == "▁▁"
    assert sparkline([None]) == ""
