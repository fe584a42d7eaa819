"""A TransformerLens 3.x ``HookedTransformer`` built offline from a Hugging Face model already in memory.

TransformerLens 3.9 is the last release with ``HookedTransformer``; 4.x has only ``TransformerBridge``,
and the two cannot share a virtual environment. ``HookedTransformer.from_pretrained`` looks the model up
by name (and, for unknown names such as SmolLM2, on the hub), so it refuses to load offline. Here the
``HookedTransformerConfig`` is built from the Hugging Face config itself, mirroring the Llama and
GPT-2 branches of TransformerLens 3.9's ``convert_hf_model_config``, and the weights go through
TransformerLens's own ``convert_llama_weights`` / ``convert_gpt2_weights`` and
``load_and_process_state_dict`` (folding and centring exactly as ``from_pretrained`` does).

The lens itself needs nothing special: ``lens_plugins.transformer_lens`` reads HookedTransformer caches.
"""

from typing import Any, Callable

import torch

_TL3_HINT = (
    "HookedTransformer needs transformer-lens 3.9, the last release that has it (4.x has only "
    "TransformerBridge, and the two versions cannot share an environment). Install it in a separate venv: "
    "python -m venv .venv-tl3 && .venv-tl3/bin/pip install torch==2.13.0 && "
    ".venv-tl3/bin/pip install transformer-lens==3.9.0 -e . (the project's `make venv-tl3` does this). "
    "Here, use the TransformerBridge backend instead: lens_plugins.load_default_model(backend='transformer_lens')."
)

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError as error:  # transformer-lens 4.x removed it; or transformer-lens is not installed
    raise ImportError(f"{_TL3_HINT} (importing it failed: {error})") from error

from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights

from lens_plugins.core.errors import LensNotImplementedError, LensValueError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "GPT2LMHeadModel")


def _rope_parameters(config) -> dict[str, Any]:
    """``rope_parameters`` (transformers >= 5) or the older ``rope_theta`` / ``rope_scaling`` pair."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def _llama_config(config) -> dict[str, Any]:
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            # convert_llama_weights writes zero biases: a biased checkpoint would load silently wrong.
            raise LensNotImplementedError(f"this Llama config sets {flag}=True, which TransformerLens's convert_llama_weights drops")
    n_heads = config.num_attention_heads
    d_head = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    rope = _rope_parameters(config)
    if "rope_theta" not in rope:
        raise LensValueError("the Llama config has no rope_theta (neither rope_parameters['rope_theta'] nor rope_theta)")
    cfg = {
        "d_model": config.hidden_size,
        "d_head": d_head,
        "n_heads": n_heads,
        # TransformerLens uses grouped-query attention whenever n_key_value_heads is set.
        "n_key_value_heads": n_kv if n_kv != n_heads else None,
        "d_mlp": config.intermediate_size,
        "n_layers": config.num_hidden_layers,
        "n_ctx": config.max_position_embeddings,
        "eps": config.rms_norm_eps,
        "d_vocab": config.vocab_size,
        "act_fn": config.hidden_act,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
        "rotary_dim": d_head,
        "rotary_base": rope["rope_theta"],
        "final_rms": True,
        "gated_mlp": True,
    }
    rope_type = (rope.get("rope_type") or rope.get("type") or "default").lower()
    if rope_type == "llama3":
        cfg.update(
            use_NTK_by_parts_rope=True,
            NTK_original_ctx_len=rope.get("original_max_position_embeddings", config.max_position_embeddings),
            NTK_by_parts_low_freq_factor=rope.get("low_freq_factor", 1.0),
            NTK_by_parts_high_freq_factor=rope.get("high_freq_factor", 4.0),
            NTK_by_parts_factor=rope.get("factor", 1.0),
        )
    elif rope_type != "default":
        raise LensNotImplementedError(f"rope_type {rope_type!r} is not supported here (only 'default' and 'llama3')")
    return cfg


def _gpt2_config(config) -> dict[str, Any]:
    if getattr(config, "reorder_and_upcast_attn", False):
        raise LensNotImplementedError("GPT-2 configs with reorder_and_upcast_attn=True are not supported")
    return {
        "d_model": config.n_embd,
        "d_head": config.n_embd // config.n_head,
        "n_heads": config.n_head,
        "d_mlp": getattr(config, "n_inner", None) or 4 * config.n_embd,
        "n_layers": config.n_layer,
        "n_ctx": config.n_positions,
        "eps": config.layer_norm_epsilon,
        "d_vocab": config.vocab_size,
        "act_fn": config.activation_function,
        "use_attn_scale": getattr(config, "scale_attn_weights", True),
        "use_local_attn": False,
        "scale_attn_by_inverse_layer_idx": getattr(config, "scale_attn_by_inverse_layer_idx", False),
        "normalization_type": "LN",
    }


_FAMILIES: dict[str, tuple[Callable[[Any], dict[str, Any]], Callable]] = {
    "LlamaForCausalLM": (_llama_config, convert_llama_weights),
    "GPT2LMHeadModel": (_gpt2_config, convert_gpt2_weights),
}


def architecture_of(hf_model) -> str:
    """The Hugging Face class name that selects the conversion (``config.architectures`` may be unset
    on a model built from a config, so the model's own class decides)."""
    return type(hf_model).__name__


def hooked_transformer_config(hf_model, fold_ln: bool = False) -> HookedTransformerConfig:
    """The ``HookedTransformerConfig`` of a Llama-family or GPT-2 Hugging Face causal LM."""
    architecture = architecture_of(hf_model)
    if architecture not in _FAMILIES:
        raise LensNotImplementedError(
            f"hooked_transformer_from_hf supports {', '.join(SUPPORTED_ARCHITECTURES)} (Llama-family models "
            f"such as SmolLM2, and GPT-2), not {architecture}; use the TransformerBridge backend "
            "(transformer-lens 4.x) for other families"
        )
    config = hf_model.config
    if getattr(config, "quantization_config", None):
        raise LensNotImplementedError("quantized Hugging Face models are not supported: load the model dequantized (float32)")
    build_config, _ = _FAMILIES[architecture]
    cfg = build_config(config)
    normalization = cfg["normalization_type"]
    cfg.update(
        original_architecture=architecture,
        model_name=str(getattr(config, "name_or_path", "") or architecture).rstrip("/").split("/")[-1] or architecture,
        tokenizer_name=None,
        init_weights=False,  # the weights come from the HF model
        dtype=next(hf_model.parameters()).dtype,
        device=next(hf_model.parameters()).device.type,
        default_prepend_bos=True,
        # As from_pretrained does: with fold_ln the model is built with parameter-free norms.
        normalization_type={"LN": "LNPre", "RMS": "RMSPre"}[normalization] if fold_ln else normalization,
    )
    return HookedTransformerConfig.from_dict(cfg)


def hooked_transformer_from_hf(
    hf_model,
    tokenizer=None,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
) -> HookedTransformer:
    """A TransformerLens 3.9 ``HookedTransformer`` with the weights of ``hf_model``, in eval mode.

    Offline: the config comes from ``hf_model.config``, the weights from the model in memory (copied,
    so the Hugging Face model is left untouched). The processing flags mean what they mean in
    ``HookedTransformer.from_pretrained`` and have its defaults; none of them changes the model's
    log-probabilities. ``center_writing_weights`` only applies to LayerNorm models (TransformerLens
    skips it for RMSNorm). Supported: ``LlamaForCausalLM`` (e.g. SmolLM2) and ``GPT2LMHeadModel``.
    """
    architecture = architecture_of(hf_model)
    cfg = hooked_transformer_config(hf_model, fold_ln=False)  # load_and_process_state_dict folds
    _, convert = _FAMILIES[architecture]
    with torch.no_grad():
        # TransformerLens centres some weights in place: work on copies, never on the HF parameters.
        state_dict = {name: tensor.detach().clone() for name, tensor in convert(hf_model, cfg).items()}
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
    )
    return model.eval()

__all__ = ["SUPPORTED_ARCHITECTURES", "architecture_of", "hooked_transformer_config", "hooked_transformer_from_hf"]
