"""`python -m mlora_pp.trace`: a run's trace.json as a text summary and as a timeline picture."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from mlora_pp.trace import TraceEvent, TraceRecorder, main, read_totals, read_trace, summarise, write_trace

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


def _events(count: int) -> list[TraceEvent]:
    """count actions one after the other, 10 ms each, every third one waiting 4 ms of it."""
    return [TraceEvent(f"F{i} a:{i}.0", "F", i * 0.01, (i + 1) * 0.01, wait=0.004 if i % 3 == 0 else 0.0)
            for i in range(count)]


def test_a_recorder_keeps_the_first_and_last_actions_and_totals_over_all():
    events = _events(1000)
    recorder = TraceRecorder.of(events, limit=10)
    assert [e.name for e in recorder.events] == [e.name for e in events[:5] + events[-5:]]
    assert recorder.actions == 1000 and recorder.dropped == 990
    assert recorder.busy_s == pytest.approx(sum(e.end - e.start - e.wait for e in events))
    assert recorder.wait_s == pytest.approx(sum(e.wait for e in events))
    short = TraceRecorder.of(events[:7], limit=10)  # fewer than the limit: all kept
    assert short.events == events[:7] and short.dropped == 0
    assert TraceRecorder.of(events, limit=0).events == [] and TraceRecorder.of(events, limit=0).actions == 1000
    shuffled = TraceRecorder.of(events[500:] + events[:500], limit=10)  # a plain list need not be in order
    assert (shuffled.first_start, shuffled.last_end) == (0.0, pytest.approx(10.0))
    with pytest.raises(ValueError, match="0 or more"):
        TraceRecorder(-1)


def test_a_trace_that_left_actions_out_is_summarised_over_the_whole_run(tmp_path, capsys):
    """The file keeps 10 actions a stage and marks the gap; the summary still counts all 1000 (and
    300 on stage 1), busy and waiting as the plain events add up."""
    stage0, stage1 = _events(1000), _events(300)
    path = tmp_path / "trace.json"
    write_trace(path, [TraceRecorder.of(stage0, limit=10), TraceRecorder.of(stage1, limit=10)])
    raw = json.loads(path.read_text())
    kept = [e for e in raw["traceEvents"] if e["ph"] == "X" and e["name"] != "wait"]
    assert [sum(e["tid"] == s for e in kept) for s in (0, 1)] == [10, 10]
    marks = [e for e in raw["traceEvents"] if e["ph"] == "i"]
    assert [(e["tid"], e["name"]) for e in marks] == [(0, "990 actions not kept"), (1, "290 actions not kept")]
    assert [e["ts"] for e in marks] == pytest.approx([50_000.0, 50_000.0])  # after the 5 actions kept first
    first, second = summarise(read_trace(path), read_totals(path))
    assert (first.actions, second.actions) == (1000, 300) and first.not_kept == 990
    assert first.span_s == pytest.approx(10.0)  # first start to last end over both stages
    assert first.busy_s == pytest.approx(sum(e.end - e.start - e.wait for e in stage0))
    assert second.wait_s == pytest.approx(sum(e.wait for e in stage1))
    assert main([str(path), "--text"]) == 0
    assert "1280 actions of the middle are left out" in capsys.readouterr().out
    # the kept events alone would say 10 actions a stage: the totals are what changed the summary
    assert [s.actions for s in summarise(read_trace(path))] == [10, 10]


def test_a_run_keeps_trace_actions_per_stage_and_counts_them_all(tmp_path):
    """A one-rank run with pipeline.trace_actions: 6 keeps 3 + 3 actions in trace.json; its totals
    count every action of the plan, and the stage's utilisation comes from them."""
    from test_training import JOBS, make_raw, make_workspace

    from mlora_pp.config import parse_config
    from mlora_pp.training import train

    workspace = make_workspace(tmp_path)
    raw = make_raw(workspace, JOBS[:2], "short-trace", trace_actions=6)
    result = train(parse_config(raw, tmp_path / "c.yaml"), progress=False)
    out = workspace[0] / "short-trace"
    trace = json.loads((out / "trace.json").read_text())
    actions = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["name"] != "wait"]
    planned = len(result.schedule.stages[0])
    assert planned > 6 and len(actions) == 6
    [totals] = trace["mlora_pp_stages"]
    assert totals["actions"] == planned and totals["kept"] == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    [stage] = [r for r in records if r.get("event") == "stage"]
    assert stage["busy_s"] == pytest.approx(totals["busy_s"]) and stage["wait_s"] == totals["wait_s"]
