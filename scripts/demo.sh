#!/usr/bin/env bash
# The main job: install (scripts/setup.sh), then build real 1-bit deltas of MiniLM-L6 for three tasks
# (cached under .cache/demo) and serve them on 127.0.0.1:8000. Ctrl-C stops it.
# Options are passed through to `bitdelta demo` (e.g. --port 8080, --rebuild, --no-serve).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m serve.cli demo "$@"
