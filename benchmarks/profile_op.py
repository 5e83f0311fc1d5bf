"""Where the batched LoRA operator's time goes: torch.profiler tables for one case.

    python -m benchmarks.profile_op --device cuda --dtype bfloat16 --d 2048 --adapters 8 --dropout 0.05

Prints the top operators by device time (self) and by host time, for ours (the path `auto` picks)
and for the base GEMM alone, over a few forward + backward calls after warm-up.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.lora_op import Case, _build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--variant", default="ours-loop", help="ours-loop, ours-grouped, naive, base")
    parser.add_argument("--rows", type=int, default=25, help="table rows")
    parser.add_argument("--sort", default="device", choices=["device", "host"], help="order of the table")
    args = parser.parse_args(argv)
    case = Case(args.d, args.adapters, args.dropout, args.tokens, args.device, getattr(torch, args.dtype))
    run = _build(case)[args.variant]
    cuda = args.device == "cuda"
    for _ in range(3):
        run()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            run()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda and args.sort == "device" else "self_cpu_time_total"
    print(f"{args.variant} d={args.d} adapters={args.adapters} dropout={args.dropout} {args.dtype} on {args.device}, 5 calls")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
