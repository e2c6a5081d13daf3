"""Where and in what precision sift computes, and the record of the stack that did it.

`[compute]` picks the device (auto | cpu | cuda | cuda:N), the base's dtype (adapters and the
exact merge arithmetic stay fp32/fp64), the attention implementation and gradient
checkpointing. Bytes are repeatable only on one stack (PyTorch and NVIDIA promise bitwise
results for one library build, one GPU architecture and one SM count; CPUs differ by vector
unit), so every workspace records the stack it was trained on (`current_stack`) and a later
training on another refuses with the difference named (`stack_differences`).
"""

from __future__ import annotations

import os
import platform
from typing import Any

from sift.errors import SiftError

DTYPES = ("float32", "bfloat16", "float16")
ATTENTIONS = ("auto", "sdpa", "eager")  # auto: transformers picks (sdpa where the model has it)
STACK_FORMAT = 1
OPTIMIZER_IMPL = "adamw-single-tensor"  # sift.loop pins foreach=False, fused=False on every device
# Recorded for the reader, not compared: a CPU's model name (its vector unit is compared), the
# GPU driver (cuBLAS and cuDNN ship with torch; the driver does not pick their kernels), and what
# the config sets (dtype, attention, threads: a change of them is a change of the training hash,
# which retrains the shards it touches anyway).
_NOT_COMPARED = {"format", "driver", "dtype", "attention", "threads"}


def check_device_spec(spec: str) -> None:
    if spec in ("auto", "cpu", "cuda"):
        return
    if spec.startswith("cuda:") and spec[5:].isdigit():
        return
    raise SiftError(f"compute.device must be auto, cpu, cuda or cuda:N; got {spec!r}")


def resolve_device(spec: str) -> Any:
    """The torch.device a spec names on this machine. `auto` is the GPU of this rank
    (`LOCAL_RANK` under torchrun / accelerate launch, `SLURM_LOCALID` under srun) when CUDA is
    there, else the CPU; `cuda` without a GPU is an error, never a silent CPU run."""
    import torch

    check_device_spec(spec)
    if spec == "cpu":
        return torch.device("cpu")
    have = torch.cuda.is_available()
    if spec == "auto" and not have:
        return torch.device("cpu")
    if not have:
        raise SiftError(
            f"--device {spec}: no CUDA GPU is visible here (torch {torch.__version__}"
            + (", built without CUDA" if torch.version.cuda is None else "")
            + "); use --device cpu or auto"
        )
    if spec in ("auto", "cuda"):
        local = os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or "0"
        index = int(local) if local.isdigit() else 0
    else:
        index = int(spec[5:])
    count = torch.cuda.device_count()
    if spec in ("auto", "cuda") and index >= count == 1:
        index = 0  # one GPU bound to this task (srun --gpus-per-task, CUDA_VISIBLE_DEVICES): it is cuda:0
    if not 0 <= index < count:
        raise SiftError(f"--device {spec}: GPU {index} does not exist here ({count} visible)")
    return torch.device("cuda", index)


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise SiftError(f"compute.dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    return getattr(torch, name)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def current_stack(device: Any, dtype: str, attention: str, threads: int) -> dict[str, Any]:
    """What an adapter's bytes depend on besides its rows and config: the device kind, name and
    architecture, the libraries (torch with its git hash, CUDA, cuDNN, transformers, peft, sift),
    the dtype, the attention implementation, the optimizer implementation and the thread count."""
    import peft
    import torch
    import transformers

    import sift

    stack: dict[str, Any] = {"format": STACK_FORMAT, "device": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        stack["device_name"] = props.name
        stack["capability"] = f"sm_{props.major}{props.minor}"
        stack["sm_count"] = props.multi_processor_count
        stack["cuda"] = torch.version.cuda
        stack["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        stack["driver"] = _driver_version()
    else:
        stack["device_name"] = _cpu_name()
        stack["capability"] = torch.backends.cpu.get_cpu_capability()
    stack.update(
        {
            "torch": torch.__version__,
            "torch_git": torch.version.git_version,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "sift": sift.__version__,
            "dtype": dtype,
            "attention": attention,
            "optimizer": OPTIMIZER_IMPL,
            "threads": threads,
        }
    )
    return stack


def _driver_version() -> str | None:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except Exception:
        return None


def stack_differences(recorded: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """`key: recorded -> current` for every compared field that differs ([] when the workspace
    recorded no stack: it was made before stacks were recorded)."""
    if not recorded:
        return []
    skip = _NOT_COMPARED | ({"device_name"} if current.get("device") == "cpu" else set())
    keys = sorted((set(recorded) | set(current)) - skip)
    return [f"{k}: {recorded.get(k)} -> {current.get(k)}" for k in keys if recorded.get(k) != current.get(k)]


def base_stack(base: Any, threads: int) -> dict[str, Any]:
    """The stack a LazyBase trains on: its device and dtype as it will load (without loading it)."""
    c = base.compute
    return current_stack(base.device(), c.dtype if c else "float32", c.attn if c else "auto", threads)


def model_stack(model: Any, threads: int) -> dict[str, Any]:
    """The stack of a loaded model as it is: its device, its weights' dtype, its attention."""
    p = next(model.parameters())
    attention = getattr(model.config, "_attn_implementation", None) or "auto"
    return current_stack(p.device, str(p.dtype).removeprefix("torch."), attention, threads)


def workspace_stack(compute: Any, threads: int) -> dict[str, Any]:
    """The stack a workspace with this [compute] and thread count trains on, on this machine."""
    return current_stack(resolve_device(compute.device), compute.dtype, compute.attn, threads)


def stack_mismatch(root: Any, recorded: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """One line naming how this stack differs from the workspace's (None: it does not)."""
    diff = stack_differences(recorded, current)
    if not diff:
        return None
    return (
        f"workspace {root} was trained on another stack ({'; '.join(diff)}): its adapters would not be "
        f"reproduced byte for byte here; run `sift train-shards -w {root} --retrain-all` to retrain every "
        "shard on this stack, or work where the workspace was made"
    )
