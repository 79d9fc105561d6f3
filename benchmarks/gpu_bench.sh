#!/usr/bin/env bash
# A third session on a lent GPU machine (the device tool): the CUDA paths after the ninth session's
# soundness reviews (autocast off on CUDA, dtype-aware bounds, cached summaries), and the
# benchmarks on the GPU:
#   * the CUDA-only tests;
#   * two short trainings (a 256-wide hKR GroupSort MLP and the LMT CNN, a few epochs each);
#   * `lipcert bench layers --device cuda` at batch 64 and 512, `lipcert bench certify --device
#     cuda` on both checkpoints (the GPU alone: nothing else runs beside the benchmarks);
#   * `lipcert attack --device cuda` on both checkpoints (0 certified points may break);
#   * the checkpoints come back in $OUT, to be certified on a CPU too.
# Needs data/mnist. A dry run on a CPU: DEVICE=cpu EPOCHS=1 LIMIT=50 OUT=/tmp/o bash $0
set -u
OUT=${OUT:-/tmp/gpu_out}
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-10}
LIMIT=${LIMIT:-1000}
START=$(date +%s)
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PY:-python3}
RUNS=runs/gpu_bench
rm -rf "$RUNS"
mkdir -p "$OUT" "$RUNS"
stamp() { echo "== $1 ($(($(date +%s) - START)) s)"; }
[ "$DEVICE" = cuda ] && nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" || exit 1

$PY -m lipcert train configs/mnist_hkr.toml --device "$DEVICE" --run-dir "$RUNS/hkr256" \
  --set model.kwargs.width=256 --set "epochs=$EPOCHS" >"$RUNS/hkr256.log" 2>&1 &
$PY -m lipcert train configs/mnist_lmt.toml --device "$DEVICE" --run-dir "$RUNS/lmt" \
  --set "epochs=$((EPOCHS / 3 + 1))" --set data.batch_size=100 >"$RUNS/lmt.log" 2>&1 &
stamp tests
timeout 200 $PY -m pytest -q -p no:cacheprovider -W ignore -rs tests/test_precision.py \
  tests/test_cli_eval.py tests/test_data.py::test_augment_stays_on_device \
  tests/test_bench_layers.py tests/test_bench_certify.py \
  tests/test_operator_bounds.py::test_cuda_bounds_factor_and_decompose_on_the_cpu 2>&1 | tail -n 8
wait
for run in hkr256 lmt; do
  stamp "$run"
  tail -n 3 "$RUNS/$run.log"
done
stamp "bench layers (batch 64)"
timeout 120 $PY -m lipcert bench layers --device "$DEVICE"
stamp "bench layers (batch 512)"
timeout 150 $PY -m lipcert bench layers --device "$DEVICE" --batch 512
for run in hkr256 lmt; do
  ckpt="$RUNS/$run/last.safetensors"
  stamp "bench certify $run"
  timeout 90 $PY -m lipcert bench certify "$ckpt" --device "$DEVICE"
  stamp "attack $run"
  timeout 90 $PY -m lipcert attack "$ckpt" --device "$DEVICE" --limit "$LIMIT" 2>&1 | tail -n 12
  cp "$ckpt" "$OUT/$run.safetensors"
done
stamp done
