"""The correctness contract on one rank: fused multi-job training equals plain PyTorch per job."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mlora_pp.config import parse_config
from mlora_pp.data import IGNORE_INDEX, collate
from mlora_pp.lora import dropout_keep_mask
from mlora_pp.model import build_stage, module_id, module_path
from mlora_pp.peft_format import load_adapter
from mlora_pp.seeding import stable_seed
from mlora_pp.tiny import WORDS, make_tiny_model
from mlora_pp.training import load_tokenizer, prepare_jobs, train

JOBS = [
    dict(name="alpha", rank=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"],
         lr=2e-3, batch_size=4, micro_batch_size=2, max_steps=3),
    dict(name="beta", rank=8, alpha=8, dropout=0.2, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"],
         lr=1e-3, batch_size=6, micro_batch_size=2, max_steps=2, lr_schedule="cosine", warmup_steps=1,
         max_grad_norm=0.5),
    dict(name="gamma", rank=12, alpha=24, rslora=True, dropout=0.0, target_modules=["q_proj"],
         lr=3e-3, lr_schedule="linear", batch_size=2, micro_batch_size=1, max_steps=4),
]


def write_dataset(path: Path, seed: int, n: int = 24) -> Path:
    rnd = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            words = [rnd.choice(WORDS) for _ in range(rnd.randint(1, 6))]
            out = [rnd.choice(WORDS) for _ in range(rnd.randint(1, 8))]
            f.write(json.dumps({"instruction": "Do the task.", "input": " ".join(words), "output": " ".join(out)}) + "\n")
    return path


def make_workspace(root: Path, layers: int = 4) -> tuple[Path, Path, dict[str, Path]]:
    """A tiny random LLaMA and one dataset per job of `JOBS` under `root`: (root, model, data)."""
    model = make_tiny_model(root / "model", layers=layers, seed=7)
    data = {job["name"]: write_dataset(root / f"{job['name']}.jsonl", seed=i) for i, job in enumerate(JOBS)}
    return root, model, data


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("train"), layers=3)


SHORT_TEMPLATE = Path(__file__).resolve().parents[1] / "configs" / "templates" / "short.yaml"
"""The test jobs' prompt: short, so that rows keep their own lengths (17 to 39 tokens) under
max_seq_len 64 and a micro-batch of several rows pads. With alpaca's preamble every row was cut
to exactly 64 tokens, so no test of training ever padded a row."""


def make_raw(workspace, jobs, out: str, model: dict | None = None, **pipeline) -> dict:
    """The YAML mapping of a test run (shared with the multi-process tests)."""
    root, model_dir, data = workspace
    return {
        "model": {"path": str(model_dir), **(model or {})},
        "output_dir": str(root / out),
        "seed": 11,
        "pipeline": pipeline or {"schedule": "lora"},
        "jobs": [{"template": str(SHORT_TEMPLATE), **job, "data": str(data[job["name"]]), "max_seq_len": 64}
                 for job in jobs],
    }


def make_cfg(workspace, jobs, out: str, **pipeline):
    return parse_config(make_raw(workspace, jobs, out, **pipeline), "test.yaml")


def adapter(out_dir: Path, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return load_adapter(out_dir / name)[1]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def assert_adapters_equal(ours: dict, ref: dict) -> None:
    """Final weights equal: 1e-5 relative over the whole adapter, 1e-4 per tensor (AdamW's m/sqrt(v)
    amplifies fp32 summation-order noise in the few entries whose momentum nearly cancels)."""
    assert set(ours) == set(ref)
    for path in ref:
        for k in (0, 1):
            assert rel_err(ours[path][k], ref[path][k]) < 1e-4, (path, k)
    flat_ours = torch.cat([t.flatten() for p in sorted(ref) for t in ours[p]])
    flat_ref = torch.cat([t.flatten() for p in sorted(ref) for t in ref[p]])
    assert rel_err(flat_ours, flat_ref) < 1e-5


def lr_factor_reference(step: int, total: int, schedule: str, warmup: int) -> float:
    import math

    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "linear":  # transformers' get_linear_schedule_with_warmup after the warm-up
        return max(0.0, (total - step) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def reference_train(workspace, job: dict, run_seed: int, grad_steps: int = 2):
    """Train one adapter alone with plain PyTorch: transformers' model, LoRA by forward hooks, AdamW.

    Each optimizer step runs the step's rows in ONE batch (no micro-batches at all), with the loss
    summed over tokens and divided by the step's loss tokens. Shared with our code: the data plan
    (which rows form a step), the initial A (copied), and the definition of the dropout mask.
    Returns the final weights and the gradients of the first `grad_steps` steps.
    """
    root, model_dir, data = workspace
    cfg = make_cfg(workspace, [job], "unused")
    tok = load_tokenizer(model_dir)
    plan_job = prepare_jobs(cfg, tok)[job["name"]]
    init_stage = build_stage(model_dir)
    init_stage.add_adapter(job["name"], job["rank"], job["alpha"], job["dropout"], job["target_modules"], seed=run_seed)
    init = init_stage.adapter_state(job["name"])

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    hf.requires_grad_(False)
    # rsLoRA (peft's use_rslora) divides by the rank's square root
    scale = job["alpha"] / (job["rank"] ** 0.5 if job.get("rslora") else job["rank"])
    p = job["dropout"]
    params: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
    keys_now: list[torch.Tensor] = []
    for layer in range(hf.config.num_hidden_layers):
        for target in job["target_modules"]:
            path = module_path(layer, target)
            a = torch.nn.Parameter(init[path][0].clone())
            b = torch.nn.Parameter(init[path][1].clone())
            params[path] = (a, b)
            mid = module_id(layer, target)

            def hook(mod, args, out, a=a, b=b, mid=mid):
                x = args[0]
                rows, seq, feat = x.shape
                if p > 0:
                    keep = dropout_keep_mask(keys_now[0], mid, seq, feat, p).reshape(rows, seq, feat)
                    x = x * keep / (1 - p)
                return out + scale * (x @ a.T) @ b.T

            hf.model.get_submodule(path).register_forward_hook(hook)
    flat = [t for pair in params.values() for t in pair]
    opt = torch.optim.AdamW(flat, lr=job["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    total = len(plan_job.plans)
    grads: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    norms: list[float] = []  # with max_grad_norm: each step's gradient norm before clipping
    for step, plan in enumerate(plan_job.plans):
        ids_in_step = [i for mb in plan.micro_batches for i in mb]
        rows = [plan_job.examples[i] for i in ids_in_step]
        input_ids, labels = collate(rows, pad_id=0)
        keys_now[:] = [torch.tensor([stable_seed("dropout", run_seed, job["name"], step, k) for k in range(len(rows))])]
        logits = hf(input_ids=input_ids).logits.float()
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum")
        loss_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        (ce / loss_tokens).backward()
        if step < grad_steps:
            grads.append({path: (a.grad.clone(), b.grad.clone()) for path, (a, b) in params.items()})
        if job.get("max_grad_norm") is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(flat, job["max_grad_norm"])))
        for group in opt.param_groups:
            group["lr"] = job["lr"] * lr_factor_reference(step, total, job.get("lr_schedule", "constant"),
                                                          job.get("warmup_steps", 0))
        opt.step()
        opt.zero_grad()
    return {path: (a.detach(), b.detach()) for path, (a, b) in params.items()}, grads, norms


def capture_grads(monkeypatch, steps: int = 2) -> dict[str, list[dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """Record each job's LoRA gradients just before its first `steps` optimizer steps."""
    from mlora_pp.config import LORA_TARGETS
    from mlora_pp.job import AdapterJob

    captured: dict[str, list] = {}
    real = AdapterJob.optimizer_step

    def spy(self, grad_norm=None):
        if self.steps_done < steps:
            params = self.optimizer.param_groups[0]["params"]
            targets = [t for t in LORA_TARGETS if t in self.config.target_modules]
            paths = [module_path(layer, t) for layer in range(len(params) // (2 * len(targets))) for t in targets]
            captured.setdefault(self.name, []).append(
                {path: (params[2 * i].grad.clone(), params[2 * i + 1].grad.clone()) for i, path in enumerate(paths)})
        return real(self, grad_norm)

    monkeypatch.setattr(AdapterJob, "optimizer_step", spy)
    return captured


def grads_close(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    if float(ref.norm()) == 0.0:
        return float(ours.norm()) == 0.0
    return rel_err(ours, ref) < tol


def nonzero_initial_b(monkeypatch) -> None:
    """Start every B from seeded random values (ours and the reference alike), so that the first
    step's gradient of A is not identically zero and the strict step-0 comparison covers it."""
    from mlora_pp.lora import BatchedLoRALinear

    real = BatchedLoRALinear.add_adapter

    def add(self, name, rank, alpha, dropout, init_seed, rslora=False):
        real(self, name, rank, alpha, dropout, init_seed, rslora)
        gen = torch.Generator().manual_seed(init_seed % 2**31)
        with torch.no_grad():
            self.lora_B[name].copy_(torch.randn(self.lora_B[name].shape, generator=gen) * 0.05)

    monkeypatch.setattr(BatchedLoRALinear, "add_adapter", add)


@pytest.mark.parametrize("lora_path", ["loop", "grouped"])
def test_fused_jobs_equal_plain_pytorch_reference(workspace, lora_path, monkeypatch):
    """Three jobs (ranks 4/8/12, dropout 0.1/0.2/0, different targets, lengths and step counts; beta
    clips its gradient norm) fused into shared micro-batches train exactly like each job alone in
    plain PyTorch (with `clip_grad_norm_` for beta, whose logged norms are the reference's).

    Gradients of step 0 are compared per tensor at 1e-5 (same weights on both sides, B started
    non-zero so every gradient is non-trivial), of step 1 at 1e-4. Final weights: 1e-5 over the whole adapter and 1e-4
    per tensor, because AdamW's update m/sqrt(v) amplifies fp32 summation-order noise in the few
    entries whose momentum nearly cancels (measured: ~1e-8 absolute in most entries, up to 1e-6 in a
    handful); the gradient check is the exact one.
    """
    nonzero_initial_b(monkeypatch)
    captured = capture_grads(monkeypatch)
    cfg = make_cfg(workspace, JOBS, f"fused-{lora_path}", schedule="lora", lora_path=lora_path)
    result = train(cfg, progress=False)
    assert result.steps == {"alpha": 3, "beta": 2, "gamma": 4}
    assert max(len(mb.parts) for mb in result.schedule.micro_batches) == 3, "jobs were not fused"
    steps = [json.loads(line) for line in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "job" in r and "event" not in r]
    for job in JOBS:
        ours = adapter(cfg.output_dir, job["name"])
        ref, ref_grads, ref_norms = reference_train(workspace, job, cfg.seed)
        assert set(ours) == set(ref)
        for step, (g_ours, g_ref) in enumerate(zip(captured[job["name"]], ref_grads)):
            assert set(g_ours) == set(g_ref)
            for path in g_ref:
                for k in (0, 1):
                    tol = 1e-5 if step == 0 else 1e-4
                    assert grads_close(g_ours[path][k], g_ref[path][k], tol), (job["name"], step, path, k)
        assert_adapters_equal(ours, ref)
        assert all(float(g_ref[p][0].norm()) > 0 for g_ref in ref_grads[:1] for p in g_ref), "A had no gradient"
        logged = [r.get("grad_norm") for r in steps if r["job"] == job["name"]]
        if job.get("max_grad_norm") is None:
            assert logged == [None] * result.steps[job["name"]]
        else:  # clipped at every step (the norms are above the bound), as clip_grad_norm_ does
            assert min(ref_norms) > job["max_grad_norm"], ref_norms
            assert logged == pytest.approx(ref_norms, rel=1e-5)


def test_two_jobs_together_equal_each_alone(workspace):
    together = make_cfg(workspace, JOBS[:2], "together")
    train(together, progress=False)
    for job in JOBS[:2]:
        alone = make_cfg(workspace, [job], f"alone-{job['name']}")
        train(alone, progress=False)
        assert_adapters_equal(adapter(together.output_dir, job["name"]), adapter(alone.output_dir, job["name"]))


def test_schedules_agree_and_metrics_are_written(workspace):
    outs = {}
    for policy in ("lora", "1f1b", "gpipe"):
        cfg = make_cfg(workspace, JOBS[:2], f"policy-{policy}", schedule=policy)
        train(cfg, progress=False)
        outs[policy] = cfg.output_dir
    for job in JOBS[:2]:
        ref = adapter(outs["gpipe"], job["name"])
        for policy in ("lora", "1f1b"):
            assert_adapters_equal(adapter(outs[policy], job["name"]), ref)
    records = [json.loads(line) for line in (outs["lora"] / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("job") == "alpha" and "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert set(r) >= {"job", "step", "loss", "tokens", "lr", "time"} and r["loss"] > 0 and r["tokens"] > 0


def test_recompute_gives_the_same_adapters(workspace):
    """Activation checkpointing replays each forward in backward; with hash dropout masks it is exact."""
    kept = make_cfg(workspace, JOBS[:2], "keep-activations")
    train(kept, progress=False)
    recomputed = make_cfg(workspace, JOBS[:2], "recompute", schedule="lora", recompute=True)
    train(recomputed, progress=False)
    for job in JOBS[:2]:
        ours, ref = adapter(recomputed.output_dir, job["name"]), adapter(kept.output_dir, job["name"])
        for path in ref:
            for k in (0, 1):
                torch.testing.assert_close(ours[path][k], ref[path][k], rtol=0, atol=0)
