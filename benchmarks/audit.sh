#!/usr/bin/env bash
# Certificate audit (issue 8, the slow part of the reliability suite): `lipcert attack` (PGD,
# 100 steps, 3 restarts, at the run's norm and eps) on the first LIMIT test points of every
# checkpoint matching RUNS, plus the tightness search (`--tightness`: the smallest adversarial
# distance PGD finds for each certified point, by bisection, over its certified radius), then the
# total of certified points attacked and broken. Exits non-zero if any certified point is broken
# (or an attack fails).
#   make audit                                    # runs/*/last.safetensors, 1000 points, CPU
#   RUNS='runs/mnist_*/last.safetensors' LIMIT=5000 DEVICE=cuda bash benchmarks/audit.sh
set -u -o pipefail
RUNS=${RUNS:-runs/*/last.safetensors}
LIMIT=${LIMIT:-1000}
DEVICE=${DEVICE:-cpu}
LIPCERT=${LIPCERT:-lipcert}
LOG=$(mktemp)
status=0
shopt -s nullglob
checkpoints=($RUNS)
[ ${#checkpoints[@]} -gt 0 ] || { echo "no checkpoint matches $RUNS" >&2; exit 2; }
for ckpt in "${checkpoints[@]}"; do
  echo "== $ckpt"
  $LIPCERT attack "$ckpt" --limit "$LIMIT" --device "$DEVICE" --tightness | tee -a "$LOG" || status=1
done
# lines: "eps=E (norm): certified A <= empirical robust B; certified points broken: K of N"
awk '/certified points broken:/ { broken += $(NF-2); total += $NF }
     END { printf "audit: %d broken of %d certified points\n", broken, total }' "$LOG"
rm -f "$LOG"
exit $status
