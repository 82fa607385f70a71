"""One switch for every progress bar: ours (tqdm), Hugging Face's, and those of child processes."""

from __future__ import annotations

import os

# tqdm (>= 4.66) reads TQDM_* defaults when it is imported; huggingface_hub and transformers read
# HF_HUB_DISABLE_PROGRESS_BARS likewise. Both reach processes started afterwards (Ray workers).
_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def silence_progress_bars() -> None:
    """Turn off progress bars in this process and in every process it starts from now on.

    Library functions take ``progress=`` themselves; this covers bars drawn by libraries
    (transformers' "Loading weights", hub downloads) and by worker processes.
    """
    os.environ.update(_ENV)
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - a transformers dependency
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


__all__ = ["silence_progress_bars"]
