"""Where the lens finds things in a Hugging Face causal LM, family by family.

The logit lens needs, per model: the decoder layers (their inputs are the lens rows), the final norm and
the unembedding (the decoder), and, for the quirks, what each family does between them. Rather than an
``isinstance`` ladder, ``ARCHITECTURES`` is a table keyed by ``config.model_type``. A family the table does not know
is found from its module tree and config (``core.discovery``) and, like every family, checked against the
model's own forward on first use (``core.verification``); paths given by hand
(``logit_lens(model, paths={"layers": "model.layers", "final_norm": "model.norm", "lm_head": "lm_head"})``)
override what was found. The table keeps its 16 families because ``models.checkpoint`` reads a decoder from
safetensors files without building the model (no module tree to discover), and because two of them hold
what discovery cannot: OPT's ``project_out`` (a projection after the final norm, folded into ``W_U``) and
BLOOM's ``adds_residual`` (discovery only finds that the sublayer writes do not add up). For the other 14,
discovery finds the same modules (``tests/test_verification.py`` checks Gemma 2's sandwich norms).

Quirks are data, not code paths:

- Gemma's RMSNorm multiplies by ``1 + w`` (``norm_one_plus``); the decoder stores ``1 + w``.
- Gemma 2/3 soft-cap the final logits; the cap is read from ``config.final_logit_softcapping``.
- OPT may project the final residual down before ``lm_head`` (``project_out``); it is folded into the
  unembedding, ``W_U = P^T @ lm_head.weight^T``, so the lens decodes ``d_model``-wide residuals.
- Gemma scales the embeddings by ``sqrt(d_model)`` and BLOOM layer-norms them before layer 0; neither needs
  an entry, because the "embed" row is read at layer 0's input, after both.

Direct logit attribution (``lens_plugins.core.dla``) needs more of each layer, also as data:

- ``o_proj``: the attention output projection, whose input is the per-head ``z`` (heads are read there).
- ``attn_out`` / ``mlp_out``: the module whose output is what the sublayer adds to the residual; Gemma 2/3
  and OLMo 2 put a norm after each sublayer (``post_attention_layernorm``, ``post_feedforward_layernorm``),
  so that norm's output, not the attention's, is what enters the stream.
- ``post_norms``: those sandwich norms are RMSNorms, so a head's share of the normed output is linear only
  at a frozen scale; the entry tells the attribution to freeze it.
- ``parallel``: GPT-J and GPT-NeoX (``use_parallel_residual``) add attention and MLP to the same input, so
  there is no residual between them (no ``resid_mid``); ``True`` or the config attribute that says so.
- ``pos_embed``: learned absolute positional embeddings (GPT-2, GPT-Neo, OPT), attributed on their own.
- ``neuron_out``: the MLP's output projection (relative to one layer), whose input is the neuron activations
  and whose weight rows are the neurons' writes (``by="neuron"``); absent for a mixture of experts.
- ``adds_residual``: BLOOM's attention and MLP add the residual inside the module, which the attribution
  does not take apart; it refuses these families with a message.

Like everything in ``lens_plugins.core``, this module imports only torch and carries no decorators: the
in-trace lens (``lens_plugins.core.trace``) calls it on the NDIF server, where it arrives by source.
"""

import torch

from lens_plugins.core import discovery
from lens_plugins.core.errors import (
    LensAttributeError,
    LensTypeError,
    LensValueError,
    UnknownArchitectureError,  # noqa: F401  (callers catch it from here)
    UnknownNormError,
)
from lens_plugins.core.readout import DecoderTensors

_LLAMA_LIKE = {
    "layers": "model.layers", "final_norm": "model.norm", "lm_head": "lm_head", "embed": "model.embed_tokens",
    "attn": "self_attn", "mlp": "mlp", "o_proj": "self_attn.o_proj", "neuron_out": "mlp.down_proj",
}
_SANDWICH = {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm", "post_norms": True}
_GPT2_LIKE = {
    "layers": "transformer.h", "final_norm": "transformer.ln_f", "lm_head": "lm_head", "embed": "transformer.wte",
    "attn": "attn", "mlp": "mlp", "o_proj": "attn.c_proj", "pos_embed": "transformer.wpe", "neuron_out": "mlp.c_proj",
}

# model_type -> module paths (``attn`` / ``mlp`` are relative to one decoder layer) and quirks.
ARCHITECTURES = {
    "gpt2": dict(_GPT2_LIKE),
    "gpt_neo": dict(_GPT2_LIKE, o_proj="attn.attention.out_proj"),
    "gptj": dict(_GPT2_LIKE, o_proj="attn.out_proj", pos_embed=None, parallel=True, neuron_out="mlp.fc_out"),
    "gpt_neox": {
        "layers": "gpt_neox.layers", "final_norm": "gpt_neox.final_layer_norm",
        "lm_head": ("lm_head", "embed_out"),  # transformers 5 renamed Pythia's embed_out
        "embed": "gpt_neox.embed_in", "attn": "attention", "mlp": "mlp", "o_proj": "attention.dense",
        "parallel": "use_parallel_residual", "neuron_out": "mlp.dense_4h_to_h",
    },
    "opt": {
        "layers": "model.decoder.layers", "final_norm": "model.decoder.final_layer_norm", "lm_head": "lm_head",
        "embed": "model.decoder.embed_tokens", "attn": "self_attn", "mlp": "fc2",
        "project_out": "model.decoder.project_out", "o_proj": "self_attn.out_proj",
        "pos_embed": "model.decoder.embed_positions", "neuron_out": "fc2",
    },
    "bloom": {
        "layers": "transformer.h", "final_norm": "transformer.ln_f", "lm_head": "lm_head",
        "embed": "transformer.word_embeddings", "attn": "self_attention", "mlp": "mlp",
        "o_proj": "self_attention.dense", "adds_residual": True,
    },
    "llama": dict(_LLAMA_LIKE),
    "mistral": dict(_LLAMA_LIKE),
    "mixtral": {k: v for k, v in _LLAMA_LIKE.items() if k != "neuron_out"},  # experts: no one down_proj
    "qwen2": dict(_LLAMA_LIKE),
    "qwen3": dict(_LLAMA_LIKE),
    "phi3": dict(_LLAMA_LIKE),
    "olmo2": dict(_LLAMA_LIKE, **_SANDWICH),
    "gemma": dict(_LLAMA_LIKE, norm_one_plus=True),
    "gemma2": dict(_LLAMA_LIKE, norm_one_plus=True, softcap_attr="final_logit_softcapping", **_SANDWICH),
    "gemma3_text": dict(_LLAMA_LIKE, norm_one_plus=True, softcap_attr="final_logit_softcapping", **_SANDWICH),
}

# Encoder-decoder families, for the DecoderLens (``core.decoder_lens``): ``encoder_layers`` are read,
# ``layers`` / ``final_norm`` / ``lm_head`` are the decoder's lens. T5 scales the decoder output by
# ``d_model ** -0.5`` before ``lm_head`` when the config says so (folded into ``W_U``). ``logit_scale_attr``
# names the config field the model's own forward reads, newest first: transformers 5 reads
# ``scale_decoder_outputs`` (and forces ``tie_word_embeddings = True`` even for the untied T5 v1.1 / FLAN-T5,
# which must not be scaled), transformers 4 read ``tie_word_embeddings``. (mT5 and UMT5 are not in the table:
# their last DecoderLens row does not reproduce the model's own output yet.)
# BART adds a ``final_logits_bias`` buffer (``logits_bias``, folded into ``b_U``) and has no final decoder
# norm. Kept apart from ``ARCHITECTURES``, whose entries are causal LMs.
ENCODER_DECODER = {
    "t5": {
        "encoder_layers": "encoder.block", "layers": "decoder.block", "final_norm": "decoder.final_layer_norm",
        "lm_head": "lm_head", "embed": "shared", "logit_scale_attr": ("scale_decoder_outputs", "tie_word_embeddings"),
    },
    "bart": {
        "encoder_layers": "model.encoder.layers", "layers": "model.decoder.layers", "final_norm": "",
        "lm_head": "lm_head", "embed": "model.shared", "logits_bias": "final_logits_bias",
    },
}

ROLES = ("layers", "final_norm", "lm_head", "embed", "attn", "mlp")


def model_type(model):
    """``config.model_type`` of an HF model or of an nnsight envoy around one (``None`` if it has none)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


PATH_ROLES = ("layers", "final_norm", "lm_head")


def resolve(model, paths=None):
    """The family spec of ``model``, with any module path in ``paths`` (a dict keyed by ``layers``,
    ``final_norm``, ``lm_head``, ...) overriding the table's.

    With ``layers``, ``final_norm`` and ``lm_head`` all given, the table is not consulted, so an unknown
    family works; ``final_norm=""`` means the model has no final norm.
    """
    if paths is not None and not isinstance(paths, dict):
        raise LensTypeError(f"paths= is a dict of module paths, e.g. {{'layers': 'model.layers', 'final_norm': "
                        f"'model.norm', 'lm_head': 'lm_head'}}; got {type(paths).__name__}")
    by_hand = {k: v for k, v in (paths or {}).items() if v is not None}
    kind = model_type(model)
    if kind in ARCHITECTURES:
        return check_paths(model, dict(ARCHITECTURES[kind], **by_hand), by_hand)
    if all(k in by_hand for k in PATH_ROLES):
        return check_paths(model, by_hand, by_hand)
    # Not in the table: found from the module tree (``discovery``), then checked against the model's own
    # numbers by ``verification.resolve`` before any lens uses it.
    return check_paths(model, dict(discovery.discover(model), **by_hand), by_hand)


def check_paths(model, spec, by_hand):
    """``spec``, once every path given by hand is a dotted string (``final_norm`` may be ``""``: no norm) that
    names the right kind of module: ``layers`` a list of blocks, ``lm_head`` a module with a 2-D weight,
    ``final_norm`` one module, not a list. A wrong path would otherwise fail deep in a forward pass or decode
    through the wrong weights; the refusal names ``paths[key]``."""
    def refuse(key, why, kind=LensValueError):
        raise kind(f"paths[{key!r}]={by_hand[key]!r} {why}; pass the dotted path of the module "
                             "(print(model) shows the module tree), e.g. paths={'layers': 'model.layers', "
                             "'final_norm': 'model.norm', 'lm_head': 'lm_head'}")

    for key, path in by_hand.items():
        if not isinstance(path, str):
            refuse(key, "is not a dotted module path (a string)")
        if not path and key != "final_norm":
            refuse(key, "is empty (only final_norm may be '', for a model without a final norm)")
    for key in (k for k in PATH_ROLES if by_hand.get(k)):
        try:
            module = get_path(model, spec[key])
        except LensAttributeError:
            refuse(key, "names no submodule of this model", LensAttributeError)
        if isinstance(module, torch.Tensor):
            refuse(key, "is a tensor (a weight), not a module")
        if key == "layers":
            try:
                len(module)
            except TypeError:
                refuse(key, "is one module, not the list of the model's blocks")
        else:
            try:
                len(module)
                refuse(key, "is a list of modules, not one module")
            except TypeError:
                pass
        if key == "lm_head" and getattr(getattr(module, "weight", None), "ndim", None) != 2:
            refuse(key, "has no 2-D weight: it is not the unembedding")
    return spec


def get_path(root, path, optional=False):
    """The submodule at a dotted ``path`` (``"model.layers"``, ``"transformer.h.0.attn"``); a tuple of
    paths means "the first that exists" (a family renamed across transformers releases). ``optional``
    returns ``None`` for a module the model may lack (OPT without ``project_out``)."""
    candidates = path if isinstance(path, tuple) else (path,)
    for candidate in candidates:
        node = root
        for part in candidate.split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part, None)
            if node is None:
                break
        if node is not None:
            return node
    if optional:
        return None
    raise LensAttributeError(
        f"{type(root).__name__} has no submodule at {' or '.join(map(repr, candidates))}; check the path "
        "(print(model) shows the module tree) and pass it by hand"
    )


def component(model, spec, role, layer=None):
    """The module playing ``role`` (one of ``ROLES``): for ``attn``/``mlp``, the one inside ``layer``."""
    if role in ("attn", "mlp"):
        return get_path(get_path(model, spec["layers"])[layer], spec[role])
    return get_path(model, spec[role])


# Norm classes that scale by (1 + weight) instead of weight, for a norm read without a family entry
# (a TransformerBridge's wrapped norm); a family entry says so itself (``norm_one_plus``).
ONE_PLUS_WEIGHT_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")  # Gemma 3n multiplies by w itself


def norm_params(norm, one_plus=None, kind=None, eps=None):
    """``(kind, weight, bias, eps)`` of a norm module as plain tensors, ``weight`` already ``1 + w`` for
    Gemma-style norms (``one_plus``; ``None``: decided by the class name); ``norm=None`` (no final norm) is
    ``("none", None, None, 0.0)``. The one norm reader: the in-trace lens, the nnsight decoder and the
    TransformerLens bridge all read norms here. Not detached (inside a trace these are the server's). ``kind``
    and ``eps``, when given (fitted by ``verification`` for a discovered family), override the class name."""
    if norm is None:
        return "none", None, None, 0.0
    norm = getattr(norm, "_module", norm)  # an nnsight envoy wraps the module
    name = type(norm).__name__
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    if kind is not None:
        weight = weight if isinstance(weight, torch.Tensor) else None
        if weight is not None and one_plus:
            weight = 1.0 + weight.float()
        bias = bias if kind == "layernorm" and isinstance(bias, torch.Tensor) else None
        return kind, weight, bias, float(eps)
    if isinstance(norm, torch.nn.LayerNorm) or name.endswith("LayerNorm") and name != "T5LayerNorm":
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-5))
        return "layernorm", weight, bias, float(eps)
    if name.endswith("RMSNorm") or name == "T5LayerNorm":  # T5's is an RMSNorm by another name
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if eps is None:
            raise UnknownNormError(f"{name} has neither `variance_epsilon` nor `eps`; pass the final norm by hand")
        if one_plus is None:
            one_plus = name in ONE_PLUS_WEIGHT_NORMS
        if weight is not None and one_plus:
            weight = 1.0 + weight.float()
        return "rmsnorm", weight, None, float(eps)
    raise UnknownNormError(
        f"lens_plugins does not know the final norm class {name!r}: expected a LayerNorm or an RMSNorm. Build "
        "the decoder by hand: lens_plugins.Decoder(norm_kind='rmsnorm' | 'layernorm' | 'none', W_U=..., "
        "norm_weight=..., norm_bias=..., norm_eps=...)"
    )


def decoder_tensors(model, spec):
    """The decoder (``readout.DecoderTensors``), read from the model's own modules (inside a trace, the
    server's weights: nothing is uploaded).

    ``W_U`` is ``[d_model, vocab]``; OPT's ``project_out`` is folded into it (and into ``b_U``).
    """
    head = get_path(model, spec["lm_head"])
    W_U = head.weight.T
    b_U = getattr(head, "bias", None)
    project = get_path(model, spec["project_out"], optional=True) if spec.get("project_out") else None
    if project is not None:
        if getattr(project, "bias", None) is not None:
            b_U = project.bias @ W_U + (0 if b_U is None else b_U)
        W_U = project.weight.T @ W_U
    config = getattr(model, "config", None)
    if scales_decoder_output(config, spec.get("logit_scale_attr")):
        W_U = W_U * config.d_model ** -0.5
    if spec.get("logits_bias"):
        extra = getattr(model, spec["logits_bias"]).reshape(-1)
        b_U = extra if b_U is None else b_U + extra
    # A named final norm must exist: dropping it silently would decode every row wrongly ("" means none).
    norm = get_path(model, spec["final_norm"]) if spec["final_norm"] else None
    kind, weight, bias, eps = norm_params(norm, spec.get("norm_one_plus"),  # not in the spec: by class name
                                          spec.get("norm_kind"), spec.get("norm_eps"))
    text_config = discovery.text_config(config)
    if spec.get("logit_multiplier"):  # a discovered family's forward scales the logits (Cohere, Granite)
        field, how = spec["logit_multiplier"]
        value = float(getattr(text_config, field))
        scale = value if how == "mul" else 1.0 / value
        W_U = W_U * scale
        b_U = None if b_U is None else b_U * scale
    softcap = getattr(text_config, spec["softcap_attr"], None) if spec.get("softcap_attr") else None
    return DecoderTensors(norm_kind=kind, W_U=W_U, norm_weight=weight, norm_bias=bias, norm_eps=eps, b_U=b_U,
                          softcap=float(softcap) if softcap else None)


def scales_decoder_output(config, names):
    """Whether the model's forward multiplies the decoder's output by ``d_model ** -0.5``: the first of
    ``names`` (a field name or several, newest transformers first) that ``config`` has, as the forward reads it."""
    if not names:
        return False
    for name in (names,) if isinstance(names, str) else names:
        if hasattr(config, name):
            return bool(getattr(config, name))
    return False


def is_parallel(model, spec):
    """Whether attention and MLP read the same residual and add to it together (no ``resid_mid``)."""
    parallel = spec.get("parallel", False)
    if isinstance(parallel, str):
        return bool(getattr(getattr(model, "config", None), parallel, False))
    return bool(parallel)


def layer_output(output):
    """A decoder layer's residual output: a tensor in transformers 5, the first element of a tuple in 4 (of a
    list in OpenAI GPT)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def layer_input(inputs):
    """A decoder layer's residual input from its ``(args, kwargs)``: ``hidden_states``, positional or not."""
    args, kwargs = inputs
    return args[0] if args else kwargs["hidden_states"]

__all__ = ["ARCHITECTURES", "ENCODER_DECODER", "ROLES", "model_type", "PATH_ROLES", "resolve", "get_path",
    "check_paths", "component", "ONE_PLUS_WEIGHT_NORMS", "norm_params", "decoder_tensors", "scales_decoder_output", "is_parallel",
    "layer_output",
    "layer_input"]
