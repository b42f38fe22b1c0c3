#!/usr/bin/env bash
# A/B of the intra-node MoE kernels on one GPU host: the working tree against an older
# tree of the package (OLD_TREE, e.g. made here with
#   mkdir -p .device_old && git archive <commit> pplx | tar -x -C .device_old
# and carried to the device), same machine, back to back; plus the gpu tests of the moe
# kernels. Variants of the current tree come as extra arguments ('NAME:KEY=VAL ...').
#   usage: OUT=dir [OLD_TREE=.device_old] [CASES=decode] bash scripts/device_moe_ab.sh \
#            [variant ...]
set -uo pipefail
OUT=${OUT:-experiments/results/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
PY=${PY:-python3}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
CASES=${CASES:-decode}
STEPS=${STEPS:-"tests new old ep2 prefill"}
source "$(dirname "$0")/steps.sh"
STEP_GREP="^(#|\\|)|triton|passed|failed|Error"
VARIANTS=()
for v in "$@"; do VARIANTS+=(--variant "$v"); done
BENCH=(-m pplx.bench moe --iters 30 --warmup 5)
want tests && step gpu_moe_tests 240 $PY -m pytest -m gpu tests/moe/test_gpu_triton.py -q -x \
  -p no:cacheprovider
want new && step new_ep$NGPU 200 $PY "${BENCH[@]}" --ranks "$NGPU" --cases "$CASES" \
  --impls triton,baseline,payload,floor "${VARIANTS[@]}" --csv "$OUT/moe.csv"
if want old && [ -n "${OLD_TREE:-}" ] && [ -d "$OLD_TREE/pplx" ]; then
  cp pplx/_native*.so "$OLD_TREE/pplx/" 2>/dev/null
  (cd "$OLD_TREE" && $PY -c "import pplx, sys; print('old tree:', pplx.__file__)" \
    && step old_ep$NGPU 150 $PY "${BENCH[@]}" --ranks "$NGPU" --cases "$CASES" --impls triton \
      --variant "fused:PPLX_MOE_FUSED=1" --csv "$OUT/moe_old.csv")
fi
want ep2 && [ "$NGPU" -ge 4 ] && step new_ep2 120 $PY "${BENCH[@]}" --ranks 2 --cases decode \
  --impls triton,payload --variant "twolaunch:PPLX_MOE_FUSED=0" --csv "$OUT/moe.csv"
want prefill && step new_prefill 120 $PY -m pplx.bench moe --ranks "$NGPU" --cases prefill \
  --iters 10 --warmup 2 --impls triton,floor --csv "$OUT/moe.csv"
cat "$OUT/summary.txt"
