"""What every notebook's setup cell calls: reproducible, quiet, and the same on Colab, Binder and locally."""

from __future__ import annotations

import os
import random
import warnings

import torch


def setup(seed: int = 0) -> torch.device:
    """Seed everything, silence progress bars and library chatter, and return the device to use.

    nbval compares every output, stderr included, so noise is switched off at its source rather than
    by ignoring whole cells.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    # Without a C compiler the package says once that its fast CPU kernel is missing; the notebooks show which
    # paths run (notebook 05, w8a16.backend_info()), and their committed outputs must not depend on it.
    warnings.filterwarnings("ignore", message="w8a16: the fast CPU kernel is not available")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # transformers is optional for notebooks 01–02
        pass
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
