"""nnsight's side of reading a model outside a trace: wrapping a Hugging Face model (``wrap_model``,
``remote_model``), its decoder (``decoder_for``) and a lens as tensors a remote trace can carry
(``lens_tensors``). Inside a trace the rows are read by ``core/trace/reader.py``, locally or on a server."""

from collections.abc import Sequence
from typing import Optional, Union

import torch

from lens_plugins.backends._common import unwrap
from lens_plugins.core import architectures
from lens_plugins.core import verification
from lens_plugins.core import lenses as core_lenses
from lens_plugins.core import rows as row_plan
from lens_plugins.core.defaults import SHIP_LIMIT_BYTES
from lens_plugins.core.errors import LensTypeError, LensValueError
from lens_plugins.decoder import Decoder
from lens_plugins.typecheck import typechecked

Sublayers = Union[bool, str]


def wrap_model(model: torch.nn.Module, tokenizer, processor=None, **kwargs):
    """An nnsight ``TransformersModel`` around an already-loaded HF causal LM (task ``text-generation``), or,
    with a ``processor``, around a vision-language model (task ``image-text-to-text``: a trace then also takes
    ``model.trace(text, images=[image])``, the processor making the inputs).

    Args:
        model: a Hugging Face ``PreTrainedModel``, already loaded.
        tokenizer: its tokenizer.
        processor: a vision-language model's processor (``AutoProcessor``), if it is one.
        **kwargs: passed to nnsight's ``LanguageModel``.

    Returns:
        An nnsight model around ``model`` (no copy of the weights).
    """
    from nnsight.modeling.transformers import TransformersModel

    if processor is not None:
        return TransformersModel(model, tokenizer=tokenizer, processor=processor, task="image-text-to-text", **kwargs)
    return TransformersModel(model, tokenizer=tokenizer, task="text-generation", **kwargs)


def remote_model(path_or_repo_id: str, tokenizer=None, **kwargs):
    """An nnsight ``TransformersModel`` for remote traces, without loading its weights here.

    Passes the tokenizer that nnsight 0.8.1 cannot find by itself with transformers >= 5.24 ("Impossible to
    guess which tokenizer to use"): ``tokenizer`` or ``AutoTokenizer.from_pretrained(path_or_repo_id)``
    (tokenizer files only). A local directory is its own repo id, so nnsight does not ask the model hub to
    canonicalise it; the server then loads that same path, as a local NDIF server (``make ndif-up``) does.
    ``remote=False`` still works: the weights load on first local use.

    Args:
        path_or_repo_id: a Hugging Face repo id the server knows, or a local directory (its own id).
        tokenizer: a tokenizer; default loaded from ``path_or_repo_id``.
        **kwargs: passed to nnsight's ``LanguageModel`` (``task="image-text-to-text"`` for a vision-language
            model: its processor is loaded from the same directory or repo).

    Returns:
        An nnsight model whose weights stay on the meta device until a local trace needs them.
    """
    from pathlib import Path

    from nnsight.modeling.huggingface import _ID_CACHE
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    name = str(path_or_repo_id)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(name)
    if Path(name).is_dir():
        _ID_CACHE.setdefault(name, name)
    kwargs.setdefault("task", "text-generation")  # task="image-text-to-text" for a vision-language model
    if kwargs["task"] == "image-text-to-text" and kwargs.get("processor") is None:
        from transformers import AutoProcessor  # nnsight cannot guess it either

        kwargs["processor"] = AutoProcessor.from_pretrained(name)
    model = TransformersModel(name, tokenizer=tokenizer, **kwargs)
    model._module.eval()  # as from_pretrained leaves it (the server's copy, and this one once loaded)
    return model


@typechecked
def decoder_for(model, paths: Optional[dict] = None) -> Decoder:
    """The lens decoder of an HF model or nnsight model, outside any trace (the same tensors the in-trace
    lens reads), e.g. to decode a saved activation with ``Decoder.logits``."""
    hf = unwrap(model)
    spec = verification.resolve(hf, paths)
    return Decoder.of(architectures.decoder_tensors(hf, spec))


@typechecked
def lens_tensors(
    model,
    lens,
    *,
    layers: Optional[Sequence[Union[int, str]]] = None,
    resid_mid: bool = False,
    sublayers: Sublayers = False,
    paths: Optional[dict] = None,
    max_bytes: int = SHIP_LIMIT_BYTES,
) -> dict:
    """An affine lens as the tensors a remote trace body can carry (``lens=`` of the in-trace entry points),
    for the rows that ``layers`` / ``resid_mid`` / ``sublayers`` choose. A lens without ``affine`` cannot
    run on a server: it is refused here, by name; so is one whose tensors would pass ``max_bytes`` (the
    message gives the route that decodes downloaded rows on the client instead)."""
    if getattr(lens, "affine", None) is None:
        raise LensTypeError(
            f"{type(lens).__name__} has no affine(rows, d_model), so it cannot run in a remote trace (the server "
            "has none of its code): run it locally (remote=False), or give it an affine form")
    hf = unwrap(model)
    spec = verification.resolve(hf, paths)
    n_layers = len(architectures.get_path(hf, spec["layers"]))
    every = row_plan.plan(n_layers, resid_mid, sublayers, architectures.is_parallel(hf, spec))
    chosen = row_plan.select(every, layers)
    d_model = architectures.decoder_tensors(hf, spec).d_model
    size = len(chosen) * (d_model + 1) * d_model * 4
    if size > max_bytes:
        raise LensValueError(
            f"this lens's tensors for {len(chosen)} rows are {size / 2**30:.1f} GiB, more than a remote request "
            f"should carry (max_bytes={max_bytes / 2**30:.1f} GiB): read fewer rows (layers=), or download the rows "
            "and decode them here: .save() the block outputs you want in your trace (e.g. "
            "model.model.layers[i].output[:, positions]), stack them [rows, batch, pos, d], then "
            "lp.models.checkpoint.decode_rows(stack, labels, lens, lp.decoder_from_checkpoint(model_dir), token_ids, "
            "tokenizer), which reads only the final norm and the unembedding from the checkpoint")
    weight, bias = lens.affine(chosen, d_model)
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    return core_lenses.shipped(detach(weight), detach(bias), [row.label for row in chosen],
                               core_lenses.made_for(lens))

__all__ = ["Sublayers", "wrap_model", "remote_model", "decoder_for", "lens_tensors"]
