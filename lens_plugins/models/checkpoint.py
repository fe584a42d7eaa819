"""A ``Decoder`` read alone from a model's safetensors checkpoint: final norm and unembedding, nothing else.

For a lens too big to upload with a remote request (a 70B model's tuned-lens translators are ~10 GB), a remote
trace downloads the residual rows at the positions asked for, and the client decodes them: it needs the
model's final norm and ``W_U``, a few GB, not the whole model. ``decoder_from_checkpoint(model_dir)`` reads
exactly those tensors from ``model.safetensors`` or the shards named in ``model.safetensors.index.json``
(memory-mapped: only their bytes are read), with the family's quirks from ``architectures`` (Gemma's ``1 + w``,
soft-capping, OPT's ``project_out``, tied embeddings).
"""

import json
from pathlib import Path
from typing import Union

import torch

from lens_plugins.core import architectures
from lens_plugins.core.errors import LensFileNotFoundError, LensValueError
from lens_plugins.decoder import Decoder


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` for a single-file or sharded checkpoint."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise LensFileNotFoundError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json: "
                                "the decoder is read from safetensors checkpoints only")
    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}


def _first(files: dict[str, Path], paths, suffix: str, prefixes=("",)):
    """The name of the first ``<prefix><path>.<suffix>`` present, or None."""
    for path in paths if isinstance(paths, tuple) else (paths,):
        for prefix in prefixes:
            name = f"{prefix}{path}.{suffix}"
            if name in files:
                return name
    return None


def decoder_from_checkpoint(model_dir: Union[str, Path]) -> Decoder:
    """The lens decoder of the Hugging Face checkpoint in ``model_dir`` (``config.json`` + safetensors),
    reading only the final norm's and the unembedding's tensors."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    kind = config.get("model_type")
    if kind not in architectures.ARCHITECTURES:
        raise LensValueError(f"{model_dir} holds a {kind!r} model; the decoder loader knows "
                         f"{sorted(architectures.ARCHITECTURES)}")
    spec = architectures.ARCHITECTURES[kind]
    files = _tensor_files(model_dir)
    prefixes = ("", "model.")  # some checkpoints name the base model's tensors without its prefix, some with

    def read(name):
        with safe_open(files[name], "pt") as f:
            return f.get_tensor(name).float()

    head = _first(files, spec["lm_head"], "weight", prefixes)
    if head is None:  # tied embeddings: the unembedding is the embedding matrix
        head = _first(files, spec["embed"], "weight", prefixes)
        if head is None:
            raise LensValueError(f"{model_dir} has neither {spec['lm_head']}.weight nor the tied {spec['embed']}.weight")
    W_U = read(head).T
    bias_name = _first(files, spec["lm_head"], "bias", prefixes)
    b_U = read(bias_name) if bias_name else None
    if spec.get("project_out"):
        project = _first(files, spec["project_out"], "weight", prefixes)
        if project is not None:
            W_U = read(project).T @ W_U
    norm_weight = _first(files, spec["final_norm"], "weight", prefixes)
    norm_bias = _first(files, spec["final_norm"], "bias", prefixes)
    weight = read(norm_weight) if norm_weight else None
    if "rms_norm_eps" in config:
        norm_kind, eps = "rmsnorm", float(config["rms_norm_eps"])
        if weight is not None and spec.get("norm_one_plus"):
            weight = 1.0 + weight
    else:
        norm_kind = "layernorm"
        eps = float(config.get("layer_norm_epsilon", config.get("layer_norm_eps", 1e-5)))
    softcap = config.get(spec["softcap_attr"]) if spec.get("softcap_attr") else None
    return Decoder(norm_kind=norm_kind, W_U=W_U.contiguous(), norm_weight=weight,
                   norm_bias=read(norm_bias) if norm_bias else None, norm_eps=eps, b_U=b_U,
                   softcap=float(softcap) if softcap else None)


def decode_rows(stack: torch.Tensor, labels, lens, decoder: Decoder, token_ids, tokenizer, **kwargs):
    """The ``LensResult`` of downloaded residual rows ``[row, batch, pos, d_model]`` through ``lens``
    (``transform``) and ``decoder``, on the client: the route for lenses too big to ship."""
    from lens_plugins.core.rows import Row
    from lens_plugins.methods.lens import logit_lens_from_stack

    rows = [Row.parse(label) for label in labels]
    flat = stack.reshape(stack.shape[0], -1, stack.shape[-1]).float()
    with torch.no_grad():
        moved = lens.transform(flat, rows).reshape(stack.shape)
    return logit_lens_from_stack(moved, list(labels), decoder, token_ids, tokenizer, **kwargs)

__all__ = ["decoder_from_checkpoint", "decode_rows"]
