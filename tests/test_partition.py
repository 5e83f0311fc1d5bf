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


def test_auto_counts_the_head_on_loss_tokens_only():
    """A Llama-3.2-1B-shaped model: its 2048 x 128256 head is worth 4.3 layers per token, but the
    head runs on the loss tokens only, so with half the tokens in prompts it is worth half that."""
    config = build_config(build_tokenizer(), layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=8192,
                          vocab=128_256)
    layer = 2048 * 2048 * 2 + 2048 * 512 * 2 + 3 * 2048 * 8192  # q, o; k, v; gate, up, down
    splits = {}
    for share in (1.0, 0.5, 0.1):
        counts = [s.last_layer - s.first_layer for s in plan_stages(config, 4, "auto", head_share=share)]
        assert counts == brute_force(16, 4, layer, (2048 * 128_256 + 2048) * share, 2048)[1]
        splits[share] = counts
    assert splits[1.0][-1] < splits[0.5][-1] < splits[0.1][-1]


def test_head_share_is_loss_tokens_over_padded_tokens(tmp_path):
    import json

    from mlora_pp.config import JobConfig
    from mlora_pp.data import IGNORE_INDEX, collate
    from mlora_pp.job import load_job
    from mlora_pp.training import head_share

    tokenizer = build_tokenizer()
    jobs = []
    for k, template in enumerate(("alpaca", "plain")):
        path = tmp_path / f"{template}.jsonl"
        words = ["the", "of", "and", "to", "in", "is"]
        with path.open("w") as f:
            for i in range(7):
                text = " ".join(words[(i + j) % 6] for j in range(2 + 3 * i % 7))
                f.write(json.dumps({"instruction": "say " + text, "output": text, "text": text}) + "\n")
        jobs.append(load_job(JobConfig(name=f"j{k}", data=path, template=template, batch_size=4, micro_batch_size=2),
                             tokenizer, seed=k))
    loss = padded = 0
    for job in jobs:
        for plan in job.plans:
            for ids in plan.micro_batches:
                _, labels = collate([job.examples[i] for i in ids], pad_id=0)
                loss += int((labels[:, 1:] != IGNORE_INDEX).sum())
                padded += labels.numel()
    assert 0 < loss < padded
    assert head_share(jobs) == pytest.approx(loss / padded)
    assert head_share([]) == 1.0
