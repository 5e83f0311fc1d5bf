"""Cutting layers into stages: even cost with embedding and lm_head counted, clear errors."""

import pytest

from mlora_pp.config import ConfigError, parse_config
from mlora_pp.partition import PartitionError, balance, plan_stages, stage_specs
from mlora_pp.tiny import build_config, build_tokenizer


def brute_force(num_layers, num_stages, layer, head, embed):
    """Every contiguous split, for checking the DP."""
    from itertools import combinations

    best = None
    for cuts in combinations(range(1, num_layers), num_stages - 1):
        bounds = (0, *cuts, num_layers)
        costs = [(bounds[s + 1] - bounds[s]) * layer + (embed if s == 0 else 0) + (head if s == num_stages - 1 else 0)
                 for s in range(num_stages)]
        if best is None or max(costs) < best[0]:
            best = (max(costs), [bounds[s + 1] - bounds[s] for s in range(num_stages)])
    return best


@pytest.mark.parametrize("layers,stages,head", [(8, 2, 0.0), (8, 2, 2.5), (12, 4, 1.7), (7, 3, 0.4), (5, 5, 3.0)])
def test_balance_minimises_the_slowest_stage(layers, stages, head):
    counts = balance(layers, stages, layer=1.0, head=head, embed=0.01)
    assert sum(counts) == layers and min(counts) >= 1
    cost = max(c + (0.01 if s == 0 else 0) + (head if s == stages - 1 else 0) for s, c in enumerate(counts))
    assert cost == pytest.approx(brute_force(layers, stages, 1.0, head, 0.01)[0])


def test_lm_head_pushes_layers_off_the_last_stage():
    assert balance(8, 2, layer=1.0, head=2.0, embed=0.0) == [5, 3]


def test_specs_cover_the_model_once():
    specs = stage_specs([3, 2, 3])
    assert [(s.first_layer, s.last_layer, s.has_embedding, s.has_head) for s in specs] == [
        (0, 3, True, False), (3, 5, False, False), (5, 8, False, True)]


def test_auto_plan_on_a_real_config_and_explicit_balance():
    config = build_config(build_tokenizer(), layers=6, hidden=128, intermediate=256)
    specs = plan_stages(config, 2)
    assert specs[0].first_layer == 0 and specs[-1].last_layer == 6
    assert [s.last_layer - s.first_layer for s in plan_stages(config, 2, [4, 2])] == [4, 2]
    with pytest.raises(PartitionError, match="covers 5 layers; the model has 6"):
        plan_stages(config, 2, [3, 2])
    with pytest.raises(PartitionError, match="lists 3 stages but 2 ranks run"):
        plan_stages(config, 2, [2, 2, 2])
    with pytest.raises(PartitionError, match="7 stages but the model has only 6 layers"):
        plan_stages(config, 7)


def test_config_rejects_a_stage_without_layers():
    raw = {"model": {"path": "m"}, "pipeline": {"balance": [3, 0]}, "jobs": [{"name": "a", "data": "d.jsonl"}]}
    with pytest.raises(ConfigError, match="pipeline.balance: every stage needs at least one layer"):
        parse_config(raw, "run.yaml")
