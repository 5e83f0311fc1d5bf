"""Progress output: plain lines when not on a terminal, a rich live table when it is."""

import io
import json

from mlora_pp.metrics import MetricsLog, ProgressBoard


def test_plain_lines_every_log_every_steps_and_at_the_end():
    out = io.StringIO()
    board = ProgressBoard({"a": 4, "b": 2}, log_every=2, stream=out, live=False)
    board.update("a", 1, 2.5, 100)
    board.update("a", 2, 2.0, 100)
    board.update("b", 1, 3.0, 50)
    board.update("b", 2, 2.9, 50)
    board.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["[a]", "[b]"]
    assert lines[0].startswith("[a] step 2/4 loss 2.0000 tokens/s")
    assert lines[1].startswith("[b] step 2/2 loss 2.9000") and lines[1].endswith("eta -")


def test_a_clipped_job_shows_its_gradient_norm():
    out = io.StringIO()
    board = ProgressBoard({"a": 4, "b": 2}, stream=out, live=False)
    board.update("a", 1, 2.5, 100, grad_norm=0.75)
    board.update("b", 1, 3.0, 50)
    assert out.getvalue().splitlines()[0].startswith("[a] step 1/4 loss 2.5000 grad_norm 0.7500 tokens/s")
    assert "grad_norm" not in out.getvalue().splitlines()[1]
    live = io.StringIO()
    board = ProgressBoard({"a": 4, "b": 2}, stream=live, live=True)
    board.update("a", 1, 2.5, 100, grad_norm=0.75)
    board.close()
    assert "grad norm" in live.getvalue() and "0.7500" in live.getvalue()


def test_live_table_shows_every_job():
    out = io.StringIO()
    board = ProgressBoard({"upper": 3, "reverse": 3}, stream=out, live=True)
    board.update("upper", 3, 0.25, 10)
    board.mark("reverse", "failed")
    board.close()
    text = out.getvalue()
    for cell in ("upper", "3/3", "0.2500", "done", "reverse", "failed"):
        assert cell in text


def test_evaluations_print_a_line_or_fill_an_eval_column():
    out = io.StringIO()
    board = ProgressBoard({"a": 4}, stream=out, live=False)
    board.evaluated("a", 2, 1.5)
    assert out.getvalue() == "[a] eval after step 2/4: loss 1.5000\n"
    live = io.StringIO()
    board = ProgressBoard({"upper": 3, "reverse": 3}, stream=live, live=True)
    board.evaluated("upper", 3, 0.125)
    board.close()
    assert "eval loss" in live.getvalue() and "0.1250" in live.getvalue()


def test_metrics_log_appends_json_lines(tmp_path):
    log = MetricsLog(tmp_path / "m" / "metrics.jsonl")
    log.write({"job": "a", "step": 1})
    log.write({"job": "a", "step": 2})
    log.close()
    assert [json.loads(l)["step"] for l in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_table_taller_than_the_terminal_shows_the_jobs_under_way_and_counts_the_rest():
    """40 jobs, room for 10 rows: the 3 running and the paused one come first (config order), then
    queued ones; the last row and the caption count what is not shown. Admission (`start`) moves a
    job from queued to running."""
    out = io.StringIO()
    names = [f"job{i:02d}" for i in range(40)]
    board = ProgressBoard({name: 4 for name in names}, stream=out, live=True, max_rows=10)
    for name in ("job05", "job30", "job12"):
        board.start(name)
    board.update("job30", 1, 2.0, 100)
    board.update("job01", 4, 1.0, 100)  # done
    board.start("job20")
    board.mark("job20", "paused")
    board.mark("job02", "failed")
    table = board._table()
    shown = table.columns[0]._cells
    assert table.row_count == 10 and shown[:4] == ["job05", "job12", "job20", "job30"]
    assert shown[4:9] == ["job00", "job03", "job04", "job06", "job07"]  # queued, in order
    assert shown[9] == "+31 more" and table.columns[-1]._cells[9] == "29 queued, 1 done, 1 failed"
    assert table.caption.startswith("40 jobs: 3 running, 1 paused, 34 queued, 1 done, 1 failed;")
    board.close()
    assert "+31 more" in out.getvalue()
    small = ProgressBoard({"a": 2, "b": 2}, stream=io.StringIO(), live=True, max_rows=10)
    assert small._table().row_count == 2 and small.jobs["a"].state == "queued"
    small.close()


def test_a_finished_jobs_speed_stops_at_its_end():
    """A done job's tokens/s in the live table is over its own training time: it kept falling while
    other jobs trained, and no longer agreed with `launcher status`."""
    import time

    board = ProgressBoard({"a": 1, "b": 5}, stream=io.StringIO(), live=False)
    board.start("a")
    time.sleep(0.05)
    board.update("a", 1, 1.0, 1000)
    at_end = board.jobs["a"].tokens_per_s(time.perf_counter())
    time.sleep(0.2)  # b goes on training
    assert board.jobs["a"].tokens_per_s(time.perf_counter()) == at_end
