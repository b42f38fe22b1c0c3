#!/usr/bin/env bash
# The shm fabric benchmark (issue 2 targets) under several placements and engine policies,
# back to back on one machine, raw libfabric measured in the same run as pplx for each.
# Meant for a quiet many-core host (the 4x H100 machine's 64 cores); on the 2-core CI VM
# `--pin auto` pins nothing and runs minutes apart differ by up to 2x.
#   usage: bash scripts/fabric_variants.sh [OUT]     (BUDGET_S=225 VARIANTS="new ...")
# Each variant: `python -m pplx.bench fabric --provider shm --rounds R --tests lat,bw
# --sizes 1M,4M,16M,64M` (R=3: ~35-45 s, one raw_bench run and one pplx spawn per round;
# `best` variants: R=2, two of each per round).
# Default set (2026-11-28, after inflight_spin_us): the new defaults (`new`, raw and pplx one
# run each per round), the previous wait policy (`inflight0`: --inflight-spin-us 0), both
# with two draws each (`best`: --raw-poll best), then `new` and `inflight0` again so that
# each policy is measured twice, alternated. ~4 minutes in all; what would not fit in
# BUDGET_S is skipped.
# Writes $OUT/host.txt (CPU topology, load, libfabric), $OUT/variants.log (every run's
# output), $OUT/fabric_variants.csv (all rows, a `variant` column first), and prints the
# PASS/MISS lines per variant and a summary table last. Variants that would not finish
# within BUDGET_S seconds of the start are skipped (the device call has a hard limit).
set -uo pipefail
OUT=${1:-${OUT:-/tmp/fabric_variants}}
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-225}
PER_RUN_S=${PER_RUN_S:-90}
VARIANTS=${VARIANTS:-"new inflight0 best new_b inflight0_b"}
# 2026-11-28 01:43 UTC on the 4x H100 host (PERFORMANCE.md, Fabric): "pin nopin pin_busy
# pin_aside0 pin_spin" (then the defaults) in ~170 s; placement made no difference.
mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/fabric_variants.XXXXXX)
export PYTHONUNBUFFERED=1

args_of() {
  case $1 in
    # (each comes after COMMON on the command line: its --rounds wins)
    new | new_b) echo "--rounds 3 --pin none --raw-poll spin" ;;
    inflight0 | inflight0_b) echo "--rounds 3 --pin none --raw-poll spin --inflight-spin-us 0" ;;
    best) echo "--rounds 2 --pin none --raw-poll best" ;;
    # 256 MiB per rep (the default since session 4; these name it for older trees).
    new256) echo "--rounds 3 --pin none --raw-poll spin --bytes-per-rep 256M" ;;
    best256) echo "--rounds 2 --pin none --raw-poll best --bytes-per-rep 256M" ;;
    pin) echo "--pin auto" ;;
    nopin) echo "--pin none" ;;
    pin_busy) echo "--pin auto --busy-poll-us 20000" ;;
    pin_aside0) echo "--pin auto --aside-us 0" ;;
    pin_aside20) echo "--pin auto --aside-us 20000" ;;
    pin_spin) echo "--pin auto --spin-us 20000" ;;
    pin_sleep0) echo "--pin auto --sleep-us 0" ;;
    aside20) echo "--pin none --aside-us 20000" ;;
    nopin_busy) echo "--pin none --busy-poll-us 20000" ;;
    # raw_bench once per round (spin) instead of the faster of spin and yield per case: as
    # many runs as pplx gets, so that run-to-run spread does not favour one side.
    nopin_rawspin) echo "--pin none --raw-poll spin" ;;
    nopin_best) echo "--pin none --raw-poll best" ;;
    *) echo "unknown variant $1" >&2; return 1 ;;
  esac
}

{
  echo "commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo +dirty)"
  date -u +%FT%TZ
  uptime
  echo "uid $(id -u); nproc $(nproc); affinity $($PY -c 'import os; print(sorted(os.sched_getaffinity(0)))')"
  echo "ptrace_scope $(cat /proc/sys/kernel/yama/ptrace_scope 2>/dev/null || echo n/a)"
  echo "thp $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"
  echo "pin auto -> $($PY -c 'from pplx.bench.fabric import pin_plan, pin_note; print(pin_note(pin_plan()) or "none")')"
  dpkg -l 'libfabric*' 2>/dev/null | grep ^ii
  lscpu
  lscpu -e=CPU,NODE,SOCKET,CORE,CACHE 2>/dev/null | head -40
} >"$OUT/host.txt" 2>&1
head -12 "$OUT/host.txt"

COMMON="--provider shm --rounds 2 --tests lat,bw --sizes 1M,4M,16M,64M --no-png --no-progress"
# (a variant's own --rounds, after COMMON, overrides the 2)
est=$PER_RUN_S # a run's expected seconds: the last run's time + 5 once there is one
for v in $VARIANTS; do
  a=$(args_of "$v") || continue
  if ((SECONDS + est > BUDGET_S)); then
    echo "== $v skipped: ${SECONDS}s of ${BUDGET_S}s used"
    continue
  fi
  t0=$SECONDS
  # shellcheck disable=SC2086
  timeout "$PER_RUN_S" $PY -m pplx.bench fabric $COMMON $a --csv "$TMP/$v.csv" >"$TMP/$v.log" 2>&1
  rc=$?
  est=$((SECONDS - t0 + 5))
  echo "== $v rc=$rc $((SECONDS - t0))s: $a"
  { echo "===== $v rc=$rc: $a"; cat "$TMP/$v.log"; } >>"$OUT/variants.log"
  grep -E '^(PASS|MISS)|^# targets' "$TMP/$v.log" | sed 's/^/   /'
done

$PY - "$TMP" "$OUT/fabric_variants.csv" $VARIANTS <<'EOF'
import csv, os, sys

tmp, out, variants = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = []
for v in variants:
    p = os.path.join(tmp, f"{v}.csv")
    if os.path.exists(p):
        with open(p) as f:
            rows += [{"variant": v, **r} for r in csv.DictReader(f)]
if not rows:
    sys.exit("no rows")
with open(out, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
print(f"\n{'variant':12} {'lat raw':>16} {'lat pplx':>16} {'x':>5}  bw pplx/raw 1M 4M 16M 64M")
for v in variants:
    rs = [r for r in rows if r["variant"] == v]
    if not rs:
        continue
    get = lambda case, impl: [r for r in rs if r["case"] == case and r["impl"] == impl]
    lr, lp = get("lat", "raw")[0], get("lat", "pplx")[0]
    fmt = lambda r: f"{float(r['p50_us']):.2f} ({float(r['p20_us']):.2f}-{float(r['p80_us']):.2f})"
    x = float(lp["p50_us"]) / float(lr["p50_us"])
    bw = " ".join(f"{float(r['ratio']):.2f}" for r in get("bw", "pplx"))
    print(f"{v:12} {fmt(lr):>16} {fmt(lp):>16} {x:5.2f}  {bw}")
pins = sorted({n for r in rows for n in r["notes"].split("; ") if n.startswith("pin ")})
print("placement:", ", ".join(pins) or "not pinned")
EOF
rm -rf "$TMP"
