"""The tests' warm rank processes (`warm_ranks`) end as fresh `python -m launcher` processes do, and
one that does not end is killed and named."""

from __future__ import annotations

import os

import pytest

from test_pipeline import env, ranks, write_config, workspace  # noqa: F401  (workspace: a fixture)
from warm_ranks import ROOT, start_rank


def run(tmp_path, fresh: bool, args: list[str], **extra: str) -> tuple[int | None, str, str]:
    out, err = tmp_path / f"{fresh}.out", tmp_path / f"{fresh}.err"
    rank = start_rank(args, env(RANK="1", WORLD_SIZE="2", **extra), out, err, fresh=fresh, base_env=env())
    return rank.wait(120), out.read_text(), err.read_text()


@pytest.mark.parametrize("case", ["bad_variable", "bad_config", "bad_argument"])
def test_a_warm_rank_ends_as_a_fresh_one(tmp_path, case):
    """Same exit code, same output: the fork sees the test's arguments (the config's path, an unknown
    flag), environment (RANK, a variable read at start) and working directory (a relative path)."""
    config = tmp_path / "run.yaml"
    config.write_text("model: {path: nowhere}\njobs: []\n" if case == "bad_config" else "{}\n")
    args = [os.path.relpath(config, ROOT), "--no-live"] + (["--no-such-flag"] if case == "bad_argument" else [])
    extra = {"MLORA_PP_STOP_GRACE_S": "soon"} if case == "bad_variable" else {}
    warm, fresh = run(tmp_path, False, args, **extra), run(tmp_path, True, args, **extra)
    assert warm == fresh
    code, _, err = warm
    assert code == 2 and err.strip(), err
    if case == "bad_variable":
        assert err.startswith("error: rank 1: MLORA_PP_STOP_GRACE_S='soon'"), err


def test_a_rank_that_never_ends_is_killed_and_the_next_run_starts(workspace):  # noqa: F811
    config = write_config(workspace, "warm-hang")
    with pytest.raises(AssertionError, match="the ranks did not end within 6 s"):
        ranks(1, config, timeout=6, MLORA_PP_FAULT="0:0:hang")
    proc = ranks(1, config)
    assert proc.returncode == 0, proc.stderr[-4000:]
