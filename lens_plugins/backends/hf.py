"""The residual stream of a Hugging Face causal LM, read with forward hooks, for training and evaluating lenses.

Training and evaluation run the model themselves (no TransformerLens cache, no trace), so they read the
same points the nnsight lens reads: each decoder layer's input and the last layer's output, i.e. hidden
states ``0 .. n_layers`` in ``output_hidden_states`` indexing, before the final norm. ``output_hidden_states``
itself is not used: depending on the family and the transformers release its last entry is before or after
the final norm. Only the base model runs (no ``lm_head``), so no ``[tokens, vocab]`` logits are made.
"""

import inspect
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from lens_plugins.core import architectures
from lens_plugins.core import verification
from lens_plugins.core import dla
from lens_plugins.core.errors import LensTypeError, LensValueError
from lens_plugins.core.readout import DecoderTensors
from lens_plugins.core.rows import Row, plan


def hf_model(model) -> torch.nn.Module:
    """The Hugging Face model inside an nnsight model (``_module``) or a TransformerBridge
    (``original_model``), or ``model`` itself. An nnsight model made for remote use (``remote_model``) holds
    its weights on the meta device until dispatched: reading it here (training, evaluation, a cross-model map)
    needs them, so they are loaded here, once."""
    if getattr(model, "dispatched", True) is False:
        model.dispatch()
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
    n_layers = len(architectures.get_path(hf, spec["layers"]))
    return residual_rows(hf, input_ids, stack_rows(n_layers), attention_mask, spec)


def residual_rows(hf, input_ids: Tensor, rows: list[Row], attention_mask: Optional[Tensor] = None,
                  spec: Optional[dict] = None) -> Tensor:
    """``[rows, batch, seq, d_model]``: the residual at each row (sites ``embed``, ``pre``, ``mid``, ``post``) of
    one forward pass without grad, in the model's dtype. ``mid`` of block ``l`` is block ``l``'s input plus what
    its attention wrote (the module the nnsight reader and ``core.dla`` read), so a family whose sublayer writes
    are not module outputs, or whose blocks are parallel (no point between attention and MLP), is refused."""
    spec = spec or verification.resolve(hf)
    layers = architectures.get_path(hf, spec["layers"])
    if any(row.site not in ("embed", "pre", "mid", "post") for row in rows):
        raise LensValueError(f"residual_rows reads embed / pre / mid / post rows, got {[row.label for row in rows]}")
    mids = sorted({row.layer for row in rows if row.site == "mid"})
    if mids:
        check_mid(hf, spec)
    inputs = sorted({row.layer for row in rows if row.site in ("embed", "pre")} | set(mids))
    outputs = sorted({row.layer for row in rows if row.site == "post"})
    captured: dict[tuple[str, int], Tensor] = {}
    handles = []

    def keep_input(index):
        def hook(module, args, kwargs):
            captured["in", index] = architectures.layer_input((args, kwargs)).detach()
        return hook

    def keep_output(index, key):
        def hook(module, args, output):
            captured[key, index] = architectures.layer_output(output).detach()
        return hook

    try:
        for index in inputs:
            handles.append(layers[index].register_forward_pre_hook(keep_input(index), with_kwargs=True))
        for index in outputs:
            handles.append(layers[index].register_forward_hook(keep_output(index, "out")))
        for index in mids:
            handles.append(attention_write(layers[index], spec).register_forward_hook(keep_output(index, "attn")))
        base = getattr(hf, "base_model", hf)
        with torch.no_grad():
            base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    def value(row):
        if row.site in ("embed", "pre"):
            return captured["in", row.layer]
        if row.site == "post":
            return captured["out", row.layer]
        h = captured["in", row.layer]
        return h + captured["attn", row.layer].reshape(h.shape)

    return torch.stack([value(row) for row in rows])


def check_mid(hf, spec: dict) -> None:
    """Refuse ``mid`` rows where the residual between attention and MLP cannot be read: parallel blocks (there
    is none), or a family whose attention write is not a module output (``core.dla.check_sublayer_writes``)."""
    if architectures.is_parallel(hf, spec):
        raise LensValueError("this model's blocks are parallel (attention and MLP read the same input), so there is "
                             "no residual between them: no mid rows")
    dla.check_sublayer_writes(spec)


def attention_write(layer: torch.nn.Module, spec: dict) -> torch.nn.Module:
    """The module of one decoder layer whose output is what its attention adds to the residual (the attention,
    or its sandwich norm): block input + that output is the layer's ``mid`` residual."""
    return architectures.get_path(layer, spec.get("attn_out", spec["attn"]))


def block_outputs(hf, input_ids: Tensor, layers: list[int], spec: Optional[dict] = None,
                  prefix: int = 0, mid_layers: Sequence[int] = ()) -> list[Tensor]:
    """The outputs ``[batch, seq - prefix, d_model]`` of decoder layers ``layers`` (sorted, the last being the
    model's last layer for a Jacobian-lens fit) at positions ``prefix ..``, on one autograd graph rooted at the
    earliest of them: that output is made to require grad, so with frozen parameters the graph holds only the
    layers above it. The base model runs (no ``lm_head``).

    ``mid_layers`` adds, after the outputs, one tensor per layer whose gradient is the gradient at that layer's
    ``mid`` residual (between attention and MLP): its attention write, which reaches the rest of the model only
    through ``mid = input + write``, so ``d out / d write = d out / d mid``. The graph's root is then the earliest
    point in stream order (block ``l``'s mid comes before its output).

    With ``prefix > 0`` the first ``prefix`` positions run once without grad and reach the rest only through
    their keys and values (the model's own cache): under causal attention nothing at those positions depends on
    a later one, so no gradient the fit asks for passes through them, and the backward passes skip them."""
    spec = spec or verification.resolve(hf)
    modules = architectures.get_path(hf, spec["layers"])
    mid_layers = sorted(set(mid_layers))
    if mid_layers:
        check_mid(hf, spec)
    captured: dict[tuple[str, int], Tensor] = {}
    # stream order: block l's mid at 2l + 1, its output at 2l + 2
    root = min([("out", index) for index in layers] + [("mid", index) for index in mid_layers],
               key=lambda point: 2 * point[1] + (2 if point[0] == "out" else 1))

    def keep(key):
        def hook(module, args, output):
            h = architectures.layer_output(output)
            if key == root and not h.requires_grad:
                h.requires_grad_(True)
            captured[key] = h
        return hook

    base = getattr(hf, "base_model", hf)
    cache = {}
    if prefix:
        # transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns until 5.40)
        name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        with torch.no_grad():
            out = base(input_ids=input_ids[:, :prefix], use_cache=True)
        cache = {name: out.get("cache") if out.get("cache") is not None else out.get("past_key_values")}
    handles = [modules[index].register_forward_hook(keep(("out", index))) for index in sorted(set(layers))]
    handles += [attention_write(modules[index], spec).register_forward_hook(keep(("mid", index)))
                for index in mid_layers]
    try:
        with torch.enable_grad():
            base(input_ids=input_ids[:, prefix:], use_cache=bool(prefix), **cache)
    finally:
        for handle in handles:
            handle.remove()
    reference = captured["out", layers[-1]] if layers else None
    for index in mid_layers:
        write = captured["mid", index]
        if reference is not None and write.shape != reference.shape:
            raise LensValueError(f"layer {index}'s attention write has shape {tuple(write.shape)}, not the residual's "
                                 f"{tuple(reference.shape)}: the Jacobian at its mid point cannot be read off it")
    return [captured["out", index] for index in layers] + [captured["mid", index] for index in mid_layers]


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

__all__ = ["hf_model", "stack_rows", "decoder_tensors", "residual_stack", "residual_rows", "check_mid",
           "attention_write", "block_outputs", "sublayer_io"]
