"""Cut a model's layers into contiguous pipeline stages of even cost.

With ``balance: auto`` cost is estimated per token from the shapes (multiply-adds of the frozen
projections), so the embedding (a lookup, nearly free) and the norm + lm_head (a vocab x hidden
GEMM, often worth most of a layer on small models) count as work on the first and last stage. The
head runs on the loss tokens only (`mlora_pp.head_loss`), so it is counted at their share of the
padded tokens the layers run on.
With ``balance: profile`` the same split runs on measured seconds (`mlora_pp.profiling`), where a
layer may cost differently on each stage's machine (`split_layers`).
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PretrainedConfig

from mlora_pp.model import StageSpec


class PartitionError(ValueError):
    """A split that cannot work; the message says why."""


def layer_costs(config: PretrainedConfig, head_share: float = 1.0) -> tuple[float, float, float]:
    """(embedding, one decoder layer, norm + lm_head) cost per padded token, in multiply-adds; the
    head's at `head_share` loss tokens per padded token."""
    d, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    attn = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o and k, v
    mlp = 3 * d * inter
    return float(d), float(attn + mlp), float(d * config.vocab_size + d) * head_share


def balance(num_layers: int, num_stages: int, layer: float, head: float, embed: float) -> list[int]:
    """Layer counts per stage that minimise the most expensive stage (each stage gets >= 1 layer)."""
    return split_layers(num_layers, [layer] * num_stages, embed=embed, head=head)


def stage_costs(counts: Sequence[int], layer: Sequence[float], embed: float, head: float) -> list[float]:
    """Each stage's cost: its layers at that stage's per-layer cost, plus embedding first and head last."""
    last = len(counts) - 1
    return [n * layer[s] + (embed if s == 0 else 0.0) + (head if s == last else 0.0) for s, n in enumerate(counts)]


def split_layers(num_layers: int, layer: Sequence[float], embed: float, head: float) -> list[int]:
    """Contiguous layer counts, one per entry of `layer` (that stage's cost of one layer), that
    minimise the most expensive stage; the embedding is on the first stage, the head on the last.
    Exact (dynamic programming over every split); ties go to the earliest cut found."""
    num_stages = len(layer)
    if num_stages > num_layers:
        raise PartitionError(f"{num_stages} stages but the model has only {num_layers} layers")

    def stage_cost(first: int, last: int, stage: int) -> float:
        cost = (last - first) * layer[stage]
        if stage == 0:
            cost += embed
        if stage == num_stages - 1:
            cost += head
        return cost

    # best[s][i]: minimal max-cost of placing layers [0, i) on stages [0, s)
    inf = float("inf")
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, num_layers - (num_stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], stage_cost(j, i, s - 1))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    counts, i = [], num_layers
    for s in range(num_stages, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


def stage_specs(counts: list[int]) -> list[StageSpec]:
    """StageSpecs for consecutive layer counts."""
    specs, first = [], 0
    for s, n in enumerate(counts):
        specs.append(StageSpec(first, first + n, has_embedding=s == 0, has_head=s == len(counts) - 1))
        first += n
    return specs


def plan_stages(config: PretrainedConfig, num_stages: int, balance_spec: str | list[int] = "auto",
                head_share: float = 1.0) -> list[StageSpec]:
    """The stages for `num_stages` ranks: balanced automatically (the head at `head_share` loss
    tokens per padded token, see `layer_costs`), or from explicit layer counts.

    ``profile`` gets the ``auto`` split here, a provisional plan for the checks before any weight is
    read; training replaces it by the profiled one (`mlora_pp.profiling`)."""
    num_layers = config.num_hidden_layers
    if isinstance(balance_spec, list):
        if len(balance_spec) != num_stages:
            raise PartitionError(f"lists {len(balance_spec)} stages but {num_stages} ranks run (one stage per rank)")
        if sum(balance_spec) != num_layers:
            raise PartitionError(f"covers {sum(balance_spec)} layers; the model has {num_layers}")
        return stage_specs(list(balance_spec))
    embed, layer, head = layer_costs(config, head_share)
    return stage_specs(balance(num_layers, num_stages, layer, head, embed))
