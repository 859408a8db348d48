#!/usr/bin/env bash
# The GPU measurements, prepared as one script for a short session on a CUDA machine (about
# 8 minutes on one GPU; each step has its own time limit, so one that hangs does not take the
# rest with it). Writes its logs and result files under ${OUT:-gpu-results}.
#
#   bash benchmarks/gpu_session.sh            # after 'make setup' (or with .venv present)
set -u
out="${OUT:-gpu-results}"
mkdir -p "$out"
py="${PYTHON:-.venv/bin/python}"
gpus=$("$py" -c "import torch; print(torch.cuda.device_count())")
echo "CUDA devices: $gpus" | tee "$out/summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$out/summary.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run with a limit, log it, record its exit code
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "$name: exit $?" | tee -a "$out/summary.txt"
}

# 1. The tests that need a GPU (NaN guard's lazy path, the compiled engine's CUDA graphs).
step cuda-tests 120 "$py" -m pytest -q -p no:cacheprovider -k cuda tests/
# 2. One epoch's time: the hand-written loop, fit's eager and compiled engines, same GPU.
step train-speed 240 "$py" benchmarks/train_speed.py --device cuda --threads 0 --epochs 3 \
  --rows torch,fit-loop,fit-compiled
# 3. Processes against one: NCCL, one GPU a rank, where there are at least two GPUs.
worlds=1
[ "$gpus" -ge 2 ] && worlds="1,2"
step distributed 150 "$py" benchmarks/distributed_throughput.py --device cuda --worlds "$worlds" \
  --batch-size 1024 --train-subset 51200 --rounds 2 --results "$out/distributed_throughput_cuda.json"
cat "$out/summary.txt"
