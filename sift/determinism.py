"""Everything that makes a training run repeat bit for bit on the same machine."""

from __future__ import annotations

import hashlib
import os
import sys


def enable_determinism() -> None:
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from config values (e.g. the config seed and a shard index)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def quiet_libraries() -> None:
    """transformers and datasets print progress bars and advice on stderr; sift prints its own.

    Set through their environment variables when they are not loaded yet (a command that refuses
    its input then never pays for importing them), through their API when they are."""
    import warnings

    # peft calls a transformers helper that transformers 5 has deprecated; not the user's concern
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
