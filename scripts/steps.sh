# Sourced by the device scripts: run named steps with their own time limits.
#   STEPS="a b": the steps to run (each script sets its default); OUT: where logs go.
#   want NAME          -> true when NAME is in STEPS
#   step NAME SECONDS CMD...
#       runs CMD with a time limit, output in $OUT/NAME.log; appends "NAME rc=.. Ns: CMD"
#       to $OUT/summary.txt and prints the log's last lines (STEP_GREP: only lines matching
#       that extended regex).
want() { [[ " $STEPS " == *" $1 "* ]]; }
step() {
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s: $*" | tee -a "$OUT/summary.txt"
  if [ -n "${STEP_GREP:-}" ]; then
    grep -E "$STEP_GREP" "$OUT/$name.log" | tail -n 40
  else
    tail -n 25 "$OUT/$name.log"
  fi
}
