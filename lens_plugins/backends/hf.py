"""The residual stream of a Hugging Face causal LM, read with forward hooks, for training and evaluating lenses.

Training and evaluation run the model themselves (no TransformerLens cache, no trace), so they read the
same points the nnsight lens reads: each decoder layer's input and the last layer's output, i.e. hidden
states ``0 .. n_layers`` in ``output_hidden_states`` indexing, before the final norm. ``output_hidden_states``
itself is not used: depending on the family and the transformers release its last entry is before or after
the final norm. Only the base model runs (no ``lm_head``), so no ``[tokens, vocab]`` logits are made.
"""

import inspect
from typing import Optional

import torch
from torch import Tensor

from lens_plugins.core import architectures
from lens_plugins.core import verification
from lens_plugins.core.errors import LensTypeError
from lens_plugins.core.readout import DecoderTensors
from lens_plugins.core.rows import Row, plan


def hf_model(model) -> torch.nn.Module:
    """The Hugging Face model inside an nnsight model (``_module``) or a TransformerBridge
    (``original_model``), or ``model`` itself."""
    for attribute in ("_module", "original_model"):
        inner = getattr(model, attribute, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise LensTypeError(f"expected a Hugging Face causal LM (or an nnsight / TransformerLens model around one), "
                        f"got {type(model).__name__}")
    return model


def stack_rows(n_layers: int) -> list[Row]:
    """The rows of ``residual_stack``: ``embed``, ``1_pre`` .. ``{L-1}_pre``, ``{L-1}_post`` (the default plan)."""
    return plan(n_layers)


def decoder_tensors(hf, spec: Optional[dict] = None) -> DecoderTensors:
    """The model's decoder (final norm, ``W_U``, ``b_U``, soft-cap), detached: frozen for training."""
    return architectures.decoder_tensors(hf, spec or verification.resolve(hf)).detached()


def residual_stack(hf, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                   spec: Optional[dict] = None) -> Tensor:
    """``[n_layers + 1, batch, seq, d_model]``: hidden state ``i`` is the input of layer ``i``, the last is the
    last layer's output (before the final norm). Runs without grad, in the model's dtype."""
    spec = spec or verification.resolve(hf)
    layers = architectures.get_path(hf, spec["layers"])
    captured: dict[int, Tensor] = {}
    handles = []

    def keep_input(index):
        def hook(module, args, kwargs):
            captured[index] = architectures.layer_input((args, kwargs)).detach()
        return hook

    def keep_output(module, args, output):
        captured[len(layers)] = architectures.layer_output(output).detach()

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(keep_input(index), with_kwargs=True))
    handles.append(layers[-1].register_forward_hook(keep_output))
    base = getattr(hf, "base_model", hf)
    try:
        with torch.no_grad():
            base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([captured[i] for i in range(len(layers) + 1)])

def block_outputs(hf, input_ids: Tensor, layers: list[int], spec: Optional[dict] = None,
                  prefix: int = 0) -> list[Tensor]:
    """The outputs ``[batch, seq - prefix, d_model]`` of decoder layers ``layers`` (sorted, the last being the
    model's last layer for a Jacobian-lens fit) at positions ``prefix ..``, on one autograd graph rooted at the
    earliest of them: that output is made to require grad, so with frozen parameters the graph holds only the
    layers above it. The base model runs (no ``lm_head``).

    With ``prefix > 0`` the first ``prefix`` positions run once without grad and reach the rest only through
    their keys and values (the model's own cache): under causal attention nothing at those positions depends on
    a later one, so no gradient the fit asks for passes through them, and the backward passes skip them."""
    spec = spec or verification.resolve(hf)
    modules = architectures.get_path(hf, spec["layers"])
    captured: dict[int, Tensor] = {}
    root = min(layers)

    def keep(index):
        def hook(module, args, output):
            h = architectures.layer_output(output)
            if index == root and not h.requires_grad:
                h.requires_grad_(True)
            captured[index] = h
        return hook

    base = getattr(hf, "base_model", hf)
    cache = {}
    if prefix:
        # transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns until 5.40)
        name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        with torch.no_grad():
            out = base(input_ids=input_ids[:, :prefix], use_cache=True)
        cache = {name: out.get("cache") if out.get("cache") is not None else out.get("past_key_values")}
    handles = [modules[index].register_forward_hook(keep(index)) for index in sorted(set(layers))]
    try:
        with torch.enable_grad():
            base(input_ids=input_ids[:, prefix:], use_cache=bool(prefix), **cache)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[index] for index in layers]


def sublayer_io(hf, input_ids: Tensor, layers: list[int], spec: Optional[dict] = None) -> dict:
    """``{(layer, "attn" | "mlp"): (input residual, contribution)}``, each ``[batch, seq, d_model]``, of decoder
    layers ``layers``: the attention reads the block's input and the MLP the block's input plus the
    attention's write (the block's input in a parallel block); a contribution is what the sublayer's module
    (``attn_out`` / ``mlp_out`` in the spec, else ``attn`` / ``mlp``) adds to the residual. Without grad, the
    base model only."""
    from lens_plugins.core.dla import check_sublayer_writes

    spec = spec or verification.resolve(hf)
    check_sublayer_writes(spec)
    blocks = architectures.get_path(hf, spec["layers"])
    parallel = architectures.is_parallel(hf, spec)
    captured: dict = {}
    handles = []

    def keep_input(layer):
        def hook(module, args, kwargs):
            captured[layer, "x"] = architectures.layer_input((args, kwargs)).detach()
        return hook

    def keep_output(layer, sublayer):
        def hook(module, args, output):
            captured[layer, sublayer] = architectures.layer_output(output).detach()
        return hook

    for layer in sorted(set(layers)):
        block = blocks[layer]
        handles.append(block.register_forward_pre_hook(keep_input(layer), with_kwargs=True))
        for sublayer in ("attn", "mlp"):
            module = architectures.get_path(block, spec.get(f"{sublayer}_out", spec[sublayer]))
            handles.append(module.register_forward_hook(keep_output(layer, sublayer)))
    base = getattr(hf, "base_model", hf)
    try:
        with torch.no_grad():
            base(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for layer in sorted(set(layers)):
        x = captured[layer, "x"]
        attn = captured[layer, "attn"].reshape(x.shape)
        out[layer, "attn"] = (x, attn)
        out[layer, "mlp"] = (x if parallel else x + attn, captured[layer, "mlp"].reshape(x.shape))
    return out

__all__ = ["hf_model", "stack_rows", "decoder_tensors", "residual_stack", "block_outputs", "sublayer_io"]
