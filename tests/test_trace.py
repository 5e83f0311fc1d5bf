"""`python -m mlora_pp.trace`: a run's trace.json as a text summary and as a timeline picture."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from mlora_pp.runtime import TraceEvent
from mlora_pp.trace import main, read_trace, summarise
from mlora_pp.training import write_trace

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture
def trace(tmp_path):
    """Two stages written by the run's own writer. Stage 0: F0 (fused a+b) 0-1 s, B0 1.5-3 s of which
    0.5 s waiting, S a 3-3.25 s. Stage 1: F0 1-2 s after waiting 1 s, B0 2-2.5 s, S a 3.5-4 s."""
    stage0 = [TraceEvent("F0 a:0.0+b:0.0", "F", 10.0, 11.0), TraceEvent("B0 a:0.0+b:0.0", "B", 11.5, 13.0, wait=0.5),
              TraceEvent("S a:0", "S", 13.0, 13.25)]
    stage1 = [TraceEvent("F0 a:0.0+b:0.0", "F", 10.0, 12.0, wait=1.0), TraceEvent("B0 a:0.0+b:0.0", "B", 12.0, 12.5),
              TraceEvent("S a:0", "S", 13.5, 14.0)]
    path = tmp_path / "trace.json"
    write_trace(path, [stage0, stage1])
    return path


def test_summary_splits_the_span_into_busy_wait_and_idle(trace):
    stages = read_trace(trace)
    assert [s.jobs for s in stages[0]] == [("a", "b"), (), ("a", "b"), ("a",)]
    assert [s.kind for s in stages[1]] == ["wait", "F", "B", "S"]
    first, second = summarise(stages)
    assert first.span_s == pytest.approx(4.0) and second.span_s == pytest.approx(4.0)
    assert (first.busy_s, first.wait_s, first.idle_s) == pytest.approx((2.25, 0.5, 1.25))
    assert (second.busy_s, second.wait_s, second.idle_s) == pytest.approx((2.0, 1.0, 1.0))
    assert first.bubble == pytest.approx(1 - 2.25 / 4) and first.actions == 3


def test_text_summary(trace, capsys):
    assert main([str(trace), "--text"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("2 stages, span 4.000 s")
    assert out[2].split() == ["0", "3", "2.250", "56.2%", "12.5%", "31.2%", "43.8%"]
    assert out[3].split() == ["1", "3", "2.000", "50.0%", "25.0%", "25.0%", "50.0%"]
    assert out[4].split() == ["all", "6", "4.250", "53.1%", "46.9%"]


def test_bad_trace_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    (tmp_path / "bad.json").write_text("{\"traceEvents\": 3}")
    assert main([str(tmp_path / "bad.json")]) == 2
    assert "not a Chrome trace" in capsys.readouterr().err


def test_png_without_matplotlib_is_one_clear_line(trace, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main([str(trace), "--png", str(tmp_path / "t.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs matplotlib" in err and "mlora_pp[plot]" in err
    assert not (tmp_path / "t.png").exists()


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (pip install 'mlora_pp[plot]')")
def test_png_has_a_lane_per_stage_and_stripes_per_fused_job(trace, tmp_path):
    from matplotlib.colors import to_hex, to_rgba

    from mlora_pp.trace import draw, tint

    png = tmp_path / "timeline.png"
    assert main([str(trace), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    fig = draw(read_trace(trace), tmp_path / "again.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["stage 0", "stage 1"]
    colours = {to_hex(c.get_facecolor()[0], keep_alpha=True) for c in ax.collections}
    # jobs a and b in two tab10 colours (forward tinted, backward full), and grey waits
    forwards = {to_hex(tint(to_rgba(c)), keep_alpha=True) for c in ("#1f77b4", "#ff7f0e")}
    assert forwards | {"#1f77b4ff", "#ff7f0eff", "#9e9e9eff"} <= colours
    # the fused forward on stage 0 is two stripes, each half a lane high
    halves = [c for c in ax.collections if to_hex(c.get_facecolor()[0], keep_alpha=True) in forwards]
    heights = sorted(round(p.get_extents().height, 3) for c in halves for p in c.get_paths())
    assert heights == [0.4] * 4
