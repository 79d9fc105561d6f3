#!/usr/bin/env bash
# One session on a lent GPU machine (the device tool), sized to a wall-clock budget:
#   * l_inf-distance net on MNIST (configs/mnist_linf_full.toml): the width and the number of
#     epochs are chosen from a timed step (benchmarks/linf_step_time.py) to fit the budget;
#   * MNIST / Fashion-MNIST l2 runs in parallel on the same GPU (fixed epochs, cut at the budget).
# Needs MNIST and Fashion-MNIST under data/ (carried), PyTorch with CUDA, and writes metrics,
# logs and small checkpoints to $OUT.   BUDGET=540 OUT=/tmp/out bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/gpu_out}
BUDGET=${BUDGET:-540}
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
RUNS=runs/gpu
mkdir -p "$OUT" "$RUNS"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1

l2_run() {  # name config overrides...
  local name=$1 config=$2
  shift 2
  local sets=()
  for kv in "$@"; do sets+=(--set "$kv"); done
  timeout $((BUDGET - 45)) python3 -m lipcert train "$config" --device cuda \
    --run-dir "$RUNS/$name" "${sets[@]}" >"$RUNS/$name.log" 2>&1 &
}
l2_run sll_m10 configs/mnist_l2_sll.toml epochs=15 data.batch_size=256 optim.lr=0.002
l2_run sll_m15 configs/mnist_l2_sll.toml epochs=15 data.batch_size=256 optim.lr=0.002 \
  loss.kwargs.margin=1.5
l2_run sll_w32 configs/mnist_l2_sll.toml epochs=15 data.batch_size=256 optim.lr=0.002 \
  model.kwargs.width=32 loss.kwargs.margin=1.2
l2_run hkr_m10 configs/mnist_hkr.toml epochs=30 data.batch_size=256 optim.lr=0.002 \
  loss.kwargs.margin=1.0
l2_run fashion configs/fashion_l2_sll.toml epochs=15 data.batch_size=256 optim.lr=0.002

timeout 150 python3 benchmarks/linf_step_time.py --device cuda --batch 512 --widths 1024 2048 \
  --ps 8.5 | tee "$RUNS/linf_step.jsonl"
read -r WIDTH EPOCHS < <(python3 - "$RUNS/linf_step.jsonl" "$(left)" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
budget = int(sys.argv[2]) - 60                   # final certification, copying out
steps = 60000 // 512
best = (512, 20)                                 # if timing failed: small and safe
for row in sorted(rows, key=lambda r: r["width"]):
    epochs = min(100, int(budget / (1.3 * steps * row["seconds"])))  # 1.3: the GPU is shared
    if epochs >= 30 or (row["width"] == 1024 and epochs >= 15):
        best = (row["width"], epochs)
print(*best)
PY
)
echo "l_inf run: width $WIDTH, $EPOCHS epochs, $(left) s left"
timeout $(($(left) - 30)) python3 -m lipcert train configs/mnist_linf_full.toml --device cuda \
  --run-dir "$RUNS/linf" --set "model.kwargs.width=$WIDTH" --set "epochs=$EPOCHS" \
  --set "eval_every=$EPOCHS" >"$RUNS/linf.log" 2>&1
wait
for run in "$RUNS"/*/; do
  name=$(basename "$run")
  echo "== $name"; tail -n 3 "$run/metrics.jsonl"; tail -n 2 "$RUNS/$name.log"
  ckpt="$run/last.safetensors"
  [ -f "$ckpt" ] && [ "$(stat -c %s "$ckpt")" -lt 16777216 ] && cp "$ckpt" "$OUT/$name.safetensors"
done
tar czf "$OUT/runs.tar.gz" --exclude='*.safetensors' "$RUNS"
ls -la "$OUT"
