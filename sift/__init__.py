"""sift: exact unlearning of fine-tuning data through sharded LoRA adapters and exact merging."""

__version__ = "0.1.0"

from sift.errors import SiftError  # noqa: E402

__all__ = ["SiftError", "__version__"]
