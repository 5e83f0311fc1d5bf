#!/usr/bin/env bash
# Everything issue 7 asks of a GPU machine, in one go (one lease is short):
#   bash benchmarks/gpu_check.sh LOG_DIR
# 1. versions; 2. tests/gpu; 3. a 2-stage pipeline on one GPU under torchrun (NCCL);
# 4. the batched LoRA operator in bf16; 5. the last stage's head + loss in bf16 (plain vs loss tokens
# only, Llama-3 vocabulary); 6. benchmarks/gpu.py (tokens/s, MFU, peak memory); 7. the base layers'
# fused kernels against eager ones, alone and in the 8-job run; 8. one base GEMM for q/k/v and one
# for gate/up against one a projection, in one layer and in the 8-job run; 9. the batched
# operator's host work per micro-batch (operators, kernel launches, times; host_overhead.py).
# Each step has its own time limit and a failing step does not stop the next. Their limits add up
# to more than a 15-minute lease: ONLY="gpu_bench layer_kernels" runs just the steps named (the
# names are the `step` lines' first words below).
set -u -o pipefail
LOG=${1:-gpu-logs}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
PY=${PYTHON:-python3}
step() { local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  echo "=== $name (limit ${limit}s)"; local t0=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$LOG/$name.log"; echo "=== $name: rc=$? in $((SECONDS - t0))s"; }

step versions 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c 'import torch, transformers, peft, bitsandbytes; print(torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__, bitsandbytes.__version__, torch.cuda.get_device_capability())'"
step gpu_tests 240 $PY -m pytest -q -p no:cacheprovider -o addopts= tests/gpu -rA
W=$(mktemp -d)
step nccl_two_stages 150 bash -c "$PY -m mlora_pp.tiny $W/m --layers 4 --init-std 0.06 >/dev/null && sed -e 's#runs/tiny-demo#$W/m#' -e 's#runs/demo#$W/out#' -e 's/float32/bfloat16/' -e 's/epochs: 8/epochs: 1/' configs/demo.yaml > $W/c.yaml && $PY -m torch.distributed.run --standalone --nproc-per-node 2 -m launcher $W/c.yaml && tail -n 3 $W/out/metrics.jsonl"
step lora_op 150 $PY -m benchmarks.lora_op --device cuda --dtype bfloat16 --tokens 8192 --dims 2048 4096 --out "$LOG/lora_op.json"
step head_loss 120 $PY -m benchmarks.head_loss --device cuda --dtype bfloat16 --dim 2048 --rows 16 --seq 512 --out "$LOG/head_loss.json"
step gpu_bench 330 $PY -m benchmarks.gpu
step layer_kernels 150 $PY -m benchmarks.layer_kernels --device cuda --dtype bfloat16 --out "$LOG/layer_kernels.json"
step gpu_bench_eager_layers 200 $PY -m benchmarks.gpu --jobs 8 --layer-kernels eager --out "$LOG/gpu-eager-layers.json"
step fused_projections 120 $PY -m benchmarks.fused_projections --device cuda --out "$LOG/fused_projections.json"
step gpu_bench_unfused 200 $PY -m benchmarks.gpu --jobs 8 --fuse-projections off --out "$LOG/gpu-unfused-projections.json"
step host_overhead 120 $PY -m benchmarks.host_overhead --device cuda --dtype bfloat16 --dropout 0 --out "$LOG/host_overhead.json"
cp benchmarks/results/gpu-*.json "$LOG/" 2>/dev/null
rm -rf "$W"
