#!/usr/bin/env bash
# Remakes the demo's shipped 1-bit deltas (serve/demo_data/*.safetensors + manifest.json) with the
# recipe in serve/demo_build.py: fine-tune MiniLM-L6 on SST-2, AG News and SUBJ, compress, distil
# the scales, measure held-out accuracy. Exits non-zero when a delta misses its accuracy floor.
# Took 54 minutes on a shared, heavily loaded 2-core machine (one torch thread). Options go to `python -m serve.demo_build` (e.g. --task sst2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m serve.demo_build --out serve/demo_data "$@"
