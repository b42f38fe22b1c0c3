#!/usr/bin/env bash
# One pass over everything that needs GPUs, for a machine with 2-4 CUDA GPUs (NVLink):
# the gpu-marked tests of the whole repository, then the benchmarks (inter-node decode at
# EP2/EP4 with the proxy round trip, intra-node decode at EP2/EP4 and prefill), the demo on
# the GPUs, and the fabric benchmark against plain libfabric on this (quiet, many-core) host.
# Logs and CSVs go to $OUT (default experiments/results/device); each step has its own
# time limit so that one slow step cannot take the others' time.
#   usage: bash scripts/device_check.sh [OUT]
set -uo pipefail
OUT=${1:-${OUT:-experiments/results/device}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
PY=${PY:-python3}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
echo "GPUs: $NGPU" | tee "$OUT/summary.txt"
# STEPS: which steps to run (default all), e.g. STEPS="gpu_tests decode fabric".
STEPS=${STEPS:-"gpu_tests internode decode prefill demo fabric"}
source "$(dirname "$0")/steps.sh"
want gpu_tests && step gpu_tests 300 $PY -m pytest -m gpu tests -v --durations=0 -p no:cacheprovider
if want internode; then
  step internode_ep$NGPU 70 $PY -m pplx.bench moe --device cuda --ranks "$NGPU" \
    --ranks-per-node $((NGPU / 2)) --shapes decode --iters 10 --csv "$OUT/moe_internode.csv"
  [ "$NGPU" -ge 4 ] && step internode_ep2 45 $PY -m pplx.bench moe --device cuda --ranks 2 \
    --ranks-per-node 1 --shapes decode --iters 10 --csv "$OUT/moe_internode.csv"
fi
if want decode; then
  step moe_decode_ep$NGPU 90 $PY -m pplx.bench moe --ranks "$NGPU" --cases decode --iters 30 \
    --warmup 5 --impls triton,baseline,payload --csv "$OUT/moe.csv"
  [ "$NGPU" -ge 4 ] && step moe_decode_ep2 75 $PY -m pplx.bench moe --ranks 2 --cases decode \
    --iters 30 --warmup 5 --impls triton,baseline,payload --csv "$OUT/moe.csv"
fi
want prefill && step moe_prefill 45 $PY -m pplx.bench moe --ranks "$NGPU" --cases prefill \
  --iters 10 --warmup 2 --csv "$OUT/moe.csv"
want demo && step demo_cuda 35 $PY -m pplx.moe.demo --device cuda --ranks 2 --experts 16 --iters 10
want fabric && step fabric_shm 90 $PY -m pplx.bench fabric --provider shm --rounds 2 \
  --csv "$OUT/fabric_shm.csv" --no-png --no-progress
cat "$OUT/summary.txt"
