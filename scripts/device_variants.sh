#!/usr/bin/env bash
# Time Triton variants of the intra-node MoE kernels twice on one GPU host, in two
# processes with the variants in opposite orders (a variant's place in the run shows up
# as a drift shared by both passes), with the defaults in both; every variant is checked
# against the reference first, and the baselines (all_to_all_single by hand, the NCCL
# payload, the peer-copy floor) run in the same processes (pplx.bench moe). Rows go to
# $OUT/moe.csv (pass 1 first), logs to $OUT/pass{1,2}.log.
#   usage: OUT=dir [RANKS=4] [CASES=decode] [ITERS=50] bash scripts/device_variants.sh \
#            'NAME:PPLX_MOE_KEY=VAL ...' ...
set -uo pipefail
OUT=${OUT:-experiments/results/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
PY=${PY:-python3}
RANKS=${RANKS:-$($PY -c "import torch; print(torch.cuda.device_count())")}
fwd=() rev=()
for v in "$@"; do fwd+=(--variant "$v"); rev=(--variant "$v" "${rev[@]}"); done
for pass in 1 2; do
  if [ $pass = 1 ]; then vs=("${fwd[@]}"); else vs=("${rev[@]}"); fi
  timeout 420 $PY -m pplx.bench moe --ranks "$RANKS" --cases "${CASES:-decode}" \
    --iters "${ITERS:-50}" --warmup 5 --impls triton,baseline,payload,floor "${vs[@]}" --csv "$OUT/moe.csv" \
    >"$OUT/pass$pass.log" 2>&1
  echo "pass $pass rc=$?"
  grep -E "^#|:dispatch |:combine |dispatch-kernels|combine-kernels" "$OUT/pass$pass.log"
done
