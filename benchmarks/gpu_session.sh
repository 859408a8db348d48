#!/usr/bin/env bash
# The GPU measurements, prepared as one script for a short session on a CUDA machine (about
# 8 minutes on one GPU, plus NLL_HOURS of VampPrior training; each step has its own time limit, so one that hangs does not take the
# rest with it). Writes its logs and result files under ${OUT:-gpu-results}.
#
#   bash benchmarks/gpu_session.sh            # after 'make setup' (or with .venv present)
#
# On a machine with PyTorch but no project install and no network: put the wheels of pyro-ppl
# and pyro-api (pure Python) and the Fashion-MNIST IDX files beside the checkout, then
#   pip install --no-deps --target /tmp/site WHEELS && \
#   PYTHON=python3 PYTHONPATH=$PWD:/tmp/site PPL_VAE_DATA=DIR bash benchmarks/gpu_session.sh
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
# 4. The VampPrior row of the log-likelihood table, trained for NLL_HOURS by the clock (the
#    compiled engine, CUDA graphs), its best epoch evaluated with K = 5000 on the test set.
step nll-vamp "$(awk "BEGIN {print int(${NLL_HOURS:-0.05} * 3600 + 300)}")" \
  "$py" benchmarks/fashion_mnist_nll.py --rows gated+vamp:500 --epochs 2000 \
  --warmup-epochs 100 --patience 50 --max-hours "${NLL_HOURS:-0.05}" --device cuda \
  --engine compiled --no-progress --surgery --out "$out/nll" --results "$out/nll.json"
cat "$out/summary.txt"
