"""The structure of a decoder-only causal LM found from its module tree and config, without a family table.

``architectures.ARCHITECTURES`` names the modules of 16 families by hand; transformers registers ~200. Every
one of them is built the same way underneath: a list of decoder blocks (one per ``num_hidden_layers``), the
token embedding the model itself reports (``get_input_embeddings``), the unembedding it reports
(``get_output_embeddings``), a norm registered after the block list, and in each block one token mixer
(attention, or a state-space / linear-attention mixer in hybrids) and one feed-forward module (an MLP or a
mixture of experts). ``discover`` reads those from the tree and returns a spec in the table's format; what
the tree cannot say (which of a block's outputs is what enters the residual stream, whether attention and MLP
run in parallel, the final norm's ``w`` or ``1 + w`` convention, a logit multiplier the forward applies) is
settled by numbers, in ``verification.verify``, from one short forward pass.

Torch only (it ships to NDIF servers with the rest of ``core``); it reads the real module behind an nnsight
envoy (``_module``) and never runs the model.
"""

import torch

from lens_plugins.core.errors import UnknownArchitectureError

# Config fields for the layer count, the width and the head count, under the names families use.
LAYER_COUNT = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
WIDTH = ("hidden_size", "n_embd", "d_model", "dim")
# A block's token mixer and feed-forward module, by the attribute names and class-name words families use.
MIXER_NAMES = ("self_attn", "attn", "attention", "self_attention", "mixer", "linear_attn", "mamba", "temporal_block",
               "token_mixer")
MIXER_WORDS = ("Attention", "Attn", "Mamba", "Mixer", "SSM", "Recurrent", "LinearAttn")
FEED_FORWARD_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe", "mlp_block", "channel_mixer")
FEED_FORWARD_WORDS = ("MLP", "MoE", "Moe", "FeedForward", "Expert", "SparseBlock", "FFN", "Ffn")
# The attention's output projection (its input is the per-head ``z`` that direct logit attribution splits).
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o", "out", "proj")
# Config fields a family's forward uses to soft-cap the final logits.
SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap", "logit_softcapping", "output_softcapping")
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm", "norm_f", "ln_out")


def text_config(config):
    """The language model's config (a multimodal config keeps it under ``text_config``)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def config_int(config, names):
    """The first of ``names`` that ``config`` holds as an integer, or ``None``."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def module_path(root, target):
    """The dotted path of ``target`` under ``root`` (``None`` if it is not there); shortest path first, as
    a module registered twice (tied weights, aliases) is reached by its own name."""
    if target is None:
        return None
    paths = [name for name, module in root.named_modules(remove_duplicate=False) if module is target]
    return min(paths, key=lambda p: (p.count("."), len(p))) if paths else None


def block_list(hf, n_layers, towers=("vision", "visual", "audio", "encoder", "image", "speech", "patcher", "mtp",
                                     "draft")):
    """``(path, module list)`` of the decoder blocks: a ``ModuleList`` with one entry per layer (the one with
    the most parameters when the config names no layer count), outside any vision/audio/encoder tower (unless
    nothing else fits: BERT-style decoders keep their blocks under ``encoder``)."""
    found = []
    for name, module in hf.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0 or not name:
            continue
        if any(word in name.lower() for word in towers):
            continue
        if n_layers is not None and len(module) != n_layers:
            continue
        if not all(isinstance(block, torch.nn.Module) and any(True for _ in block.children()) for block in module):
            continue
        size = sum(p.numel() for p in module.parameters())
        found.append((name.count("."), -size, name, module))
    if not found:
        return block_list(hf, n_layers, ()) if towers else (None, None)
    found.sort(key=lambda item: item[:3])
    return found[0][2], found[0][3]


def final_norm(hf, layers_path):
    """The final norm: the last norm-like child of the blocks' parent registered after the block list (a
    norm of the embeddings may sit there too, as in BART; ``verification`` drops one that is not applied to
    the last block's output). ``""``: none found, the last block feeds the unembedding directly."""
    parent_path, _, list_name = layers_path.rpartition(".")
    parent = hf.get_submodule(parent_path) if parent_path else hf
    names = [name for name, _ in parent.named_children()]
    after = names[names.index(list_name) + 1:] if list_name in names else names
    norms = [name for name in after
             if "norm" in type(getattr(parent, name)).__name__.lower() or name in FINAL_NORM_NAMES]
    if not norms:
        return ""
    return f"{parent_path}.{norms[-1]}" if parent_path else norms[-1]


def sublayer(block, names, words):
    """The child of ``block`` playing a role: by attribute name first, then by a word in its class name."""
    children = dict(block.named_children())
    for name in names:
        if name in children:
            return name
    for name, module in children.items():
        if any(word in type(module).__name__ for word in words):
            return name
    return None


def output_projection(block, mixer):
    """The path (relative to the block) of the mixer's last linear layer named as an output projection."""
    module = block.get_submodule(mixer)
    found = None
    for name, child in module.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in OUTPUT_PROJECTIONS and getattr(getattr(child, "weight", None), "ndim", 0) == 2:
            found = name
    return f"{mixer}.{found}" if found else None


def first_of(values):
    """One name, or a tuple of names (first that exists) when blocks differ (hybrids)."""
    distinct = list(dict.fromkeys(v for v in values if v is not None))
    return distinct[0] if len(distinct) == 1 else tuple(distinct) if distinct else None


def discover(model):
    """The spec (``architectures.ARCHITECTURES`` format) of an HF causal LM from its tree and config.

    Raises ``UnknownArchitectureError`` naming what was not found, with the ``paths=`` remedy."""
    hf = getattr(model, "_module", model)
    if not isinstance(hf, torch.nn.Module):
        raise UnknownArchitectureError(f"expected a Hugging Face causal LM (or an nnsight model around one), got "
                                       f"{type(model).__name__}")
    config = text_config(getattr(hf, "config", None))
    n_layers = config_int(config, LAYER_COUNT)
    layers_path, blocks = block_list(hf, n_layers)
    embed = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    missing = [role for role, found in (("layers", layers_path), ("lm_head", head)) if found is None]
    if missing:
        raise UnknownArchitectureError(
            f"could not find the {' and '.join(missing)} of {type(hf).__name__} (model_type "
            f"{getattr(config, 'model_type', None)!r}) in its module tree: pass the module paths by hand, e.g. "
            "paths={'layers': 'model.layers', 'final_norm': 'model.norm', 'lm_head': 'lm_head'}")
    spec = {"layers": layers_path, "final_norm": final_norm(hf, layers_path), "lm_head": module_path(hf, head),
            "embed": module_path(hf, embed), "discovered": True}
    mixers = [sublayer(block, MIXER_NAMES, MIXER_WORDS) for block in blocks]
    feed_forwards = [sublayer(block, FEED_FORWARD_NAMES, FEED_FORWARD_WORDS) for block in blocks]
    if all(mixers):
        spec["attn"] = first_of(mixers)
        projections = [output_projection(block, mixer) for block, mixer in zip(blocks, mixers)]
        if all(projections):
            spec["o_proj"] = first_of(projections)
    if all(feed_forwards):  # else (OPT-style fc1 / fc2 blocks) found by numbers in ``verification``
        spec["mlp"] = first_of(feed_forwards)
    for field in SOFTCAP_FIELDS:
        if getattr(config, field, None):
            spec["softcap_attr"] = field
            break
    positions = [name for name, module in hf.named_modules() if isinstance(module, torch.nn.Embedding)
                 and module is not embed and name.rpartition(".")[2] in ("wpe", "embed_positions", "position_embeddings")
                 and not any(word in name for word in ("vision", "encoder", "audio"))]
    if len(positions) == 1:
        spec["pos_embed"] = positions[0]
    return spec

__all__ = [
    "FEED_FORWARD_NAMES",
    "FEED_FORWARD_WORDS",
    "FINAL_NORM_NAMES",
    "LAYER_COUNT",
    "MIXER_NAMES",
    "MIXER_WORDS",
    "OUTPUT_PROJECTIONS",
    "SOFTCAP_FIELDS",
    "WIDTH",
    "block_list",
    "config_int",
    "discover",
    "final_norm",
    "first_of",
    "module_path",
    "output_projection",
    "sublayer",
    "text_config",
]
