"""Everything that makes a training run repeat bit for bit on the same machine."""

from __future__ import annotations

import hashlib
import os
import sys


def set_entry_environment() -> None:
    """What CUDA libraries read once, when they start: set on `import sift`, before any CUDA
    call (a user's own value is kept). cuBLAS needs a fixed workspace for repeatable
    reductions; the flash-attn package reads its deterministic flag through transformers."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("FLASH_ATTENTION_DETERMINISTIC", "1")


def enable_determinism() -> None:
    """Strict deterministic kernels (an op without one raises instead of running a fast
    non-deterministic kernel, which warn_only would allow), cuDNN deterministic without
    autotuning, TF32 and reduced-precision reductions off, and cuDNN attention (which has no
    deterministic backward) excluded from SDPA's choices. On the CPU only the first applies."""
    import torch

    set_entry_environment()
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)


def determinism_settings() -> dict[str, object]:
    """The settings enable_determinism pins, as they stand (recorded with a workspace's stack)."""
    import torch

    out: dict[str, object] = {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    if hasattr(torch.backends.cuda, "cudnn_sdp_enabled"):
        out["sdpa_cudnn"] = torch.backends.cuda.cudnn_sdp_enabled()
    return out


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
