"""Measure which causal-LM families lens_plugins verifies, and write ``docs/architectures.md``.

For every entry of transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, build a tiny random model from the
family's own config class (small widths, 2 layers, seeded, every norm parameter and bias perturbed so a lens
that skips one would be caught), then run ``lens_plugins.core.verification.verify`` on it: the nnsight path's
residual rows against ``output_hidden_states``, the decoded last row against the model's logits, sublayer
writes and per-head writes against the stream. Where TransformerLens ships a bridge adapter for the model
class, the same model is then booted as a ``TransformerBridge`` and checked the same way through this
package's TransformerLens backend (``bridge_check``). A family that cannot be built that small, or fails, is
listed with the reason.

Nothing on the page depends on the machine's load or speed: there is no time limit per family (a family over
one would have turned into a row that differs between a quiet and a loaded machine), every model and probe is
seeded, and a mismatch is stated as beyond the tolerance rather than by its last digits.

    python tools/architectures_coverage.py            # writes docs/architectures.md
    python tools/architectures_coverage.py --check    # exits 1 if docs/architectures.md is not current
"""

import argparse
import os
import re
import sys
import warnings
from pathlib import Path

import torch

# Nothing is fetched: a bridge adapter that looks for a processor on the hub finds none at once, instead of
# retrying (the suite's conftest sets the same).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this tree's lens_plugins, not another checkout's installed one
DOC = ROOT / "docs" / "architectures.md"
MAX_PARAMETERS = 20_000_000
SIZES = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=512, max_position_embeddings=64, n_embd=64, n_layer=2, n_head=4, d_model=64,
    n_positions=64, num_layers=2, num_heads=4, ffn_dim=96, moe_intermediate_size=32, num_experts=4,
    num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_inner=96,
    d_ff=96, ffn_hidden_size=96, num_kv_heads=2, n_kv_heads=2, multi_query_group_num=2, kv_channels=16,
    rotary_dim=8, d_inner=96, mamba_d_state=8, state_size=8, mamba_n_heads=4,
    mamba_d_head=32, mamba_expand=2, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, sliding_window=16, first_k_dense_replace=1, n_shared_experts=1,
    decoder_sparse_step=1, moe_layer_freq=1, block_size=16, num_memory_tokens=0,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=96,
    num_kv_shared_layers=0, vocab_size_per_layer_input=512, hidden_size_per_layer_input=16, embedding_size=64, input_embedding_size=64, output_embedding_size=64,
    decoder_ffn_dim=96, encoder_attention_heads=4, decoder_attention_heads=4, n_group=2, topk_group=1, num_expert_group=2,
)


# Families whose config ties sizes together in a way the shared sizes above break.
OVERRIDES = {"mamba2": dict(head_dim=32, n_groups=1), "falcon_h1": dict(mamba_d_ssm=128)}  # Mamba-2: heads x head_dim = expand x hidden_size


def has(config, key):
    """``hasattr`` that survives configs whose per-layer fields raise on global access (Gemma 4)."""
    try:
        return hasattr(config, key)
    except Exception:
        return False
# Class-name words of a token mixer that is not softmax attention (a hybrid family mixes them with attention,
# or uses them alone), and family-name words for the families that could not be built (no module tree to read).
STATE_SPACE_WORDS = ("Mamba", "Mixer", "SSM", "DeltaNet", "ShortConv", "RecurrentBlock", "Rglru", "RGLRU", "Lightning",
                     "LinearAttention", "Xlstm", "xLSTM", "Mlstm", "Rwkv", "Retention")
MOE_NAME_WORDS = ("moe", "mixtral", "dbrx", "jamba", "deepseek", "gpt_oss", "llama4", "longcat", "minimax",
                  "dots", "glm4_moe", "kimi", "bailing", "afmoe", "flex_olmo", "jetmoe", "granitemoe", "ernie4_5_moe")
HYBRID_NAME_WORDS = ("hybrid", "falcon_h1", "bamba", "zamba", "nemotron_h", "mamba", "recurrent_gemma", "lfm2",
                     "qwen3_next", "qwen3_5", "kimi_linear", "xlstm", "jamba", "plamo", "olmo_hybrid")


def shrunk(config_class, make=None):
    """An instance of ``config_class`` (``make``: its constructor) with the small sizes, sub-configs
    (``text_config`` and the like) shrunk the same way, passed to ``__init__`` so derived fields (layer
    types per layer, head dims) follow."""
    make = make or config_class
    default = make()
    kwargs = {key: value for key, value in SIZES.items() if has(default, key)}
    if has(default, "qk_rope_head_dim"):  # multi-head latent attention: its own head dim, one KV head per head
        kwargs.pop("head_dim", None)
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", 4)
    for key, value in vars(default).items():
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            kwargs[key] = shrunk(type(value)).to_dict()
        if key in ("layer_types", "layers_block_type", "hybrid_override_pattern", "block_types", "attention_types"):
            kwargs.pop(key, None)  # derived from the layer count when not given
    try:
        return make(**kwargs)
    except Exception:
        config = make()
        for key, value in kwargs.items():
            try:
                setattr(config, key, value)
            except Exception:
                pass
        return config


def tiny(model_type, class_name, seed=0, **settings):
    """A tiny random ``class_name`` model (eval mode, float32) built from ``model_type``'s config (with
    ``settings`` set on the config before the model is built)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = shrunk(CONFIG_MAPPING[model_type])
    for key, value in dict(OVERRIDES.get(model_type, {}), **settings).items():
        setattr(config, key, value)
    model_class = getattr(transformers, class_name)
    if getattr(model_class, "config_class", type(config)) is not type(config):
        # a multimodal config whose causal LM takes the text (or decoder) config
        config = getattr(config, "decoder", None) or config.get_text_config()
    with torch.device("meta"):
        size = sum(p.numel() for p in model_class(config).parameters())
    if size > MAX_PARAMETERS:
        raise RuntimeError(f"not built: {size / 1e6:.0f}M parameters at the smallest sizes tried")
    torch.manual_seed(seed)
    try:
        model = model_class._from_config(config, attn_implementation="eager")
    except Exception:
        model = model_class(config)
    generator = torch.Generator().manual_seed(seed + 10_000)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.float().eval()


def kind(model_type, model=None):
    """``dense``, ``MoE``, ``hybrid`` or ``MoE + hybrid``: from the built model's modules (experts; a
    state-space, linear-attention or convolutional mixer), or from the family name if it was not built."""
    if model is not None:
        names = [(name.lower(), type(module).__name__) for name, module in model.named_modules()]
        moe = any("expert" in name or "Expert" in cls or "MoE" in cls or "Moe" in cls for name, cls in names)
        hybrid = any(word in cls for _, cls in names for word in STATE_SPACE_WORDS)
    else:
        moe = any(word in model_type for word in MOE_NAME_WORDS)
        hybrid = any(word in model_type for word in HYBRID_NAME_WORDS)
    return {(False, False): "dense", (True, False): "MoE", (False, True): "hybrid"}.get((moe, hybrid), "MoE + hybrid")


def transformer_lens_families():
    """model_types with a TransformerLens 4.3 bridge adapter (``None`` if TransformerLens is not installed)."""
    try:
        from transformer_lens.factories.architecture_adapter_factory import (
            SUPPORTED_ARCHITECTURES,
        )
    except Exception:
        return None
    return set(SUPPORTED_ARCHITECTURES)


def check(model_type, class_name, tl_classes):
    """One row of the table: ``dict(family, cls, kind, nnsight, tl, sublayers, heads, verdict)``."""
    adapter = bool(tl_classes) and class_name in tl_classes
    row = dict(family=model_type, cls=class_name, tl="not built" if adapter else "no adapter", kind=kind(model_type))
    try:
        model = tiny(model_type, class_name)
    except Exception as error:  # the tiny config this script made is not one the family accepts
        return dict(row, nnsight="not built", sublayers="-", heads="-", verdict=f"{type(error).__name__}: {first_line(error)}")
    row["kind"] = kind(model_type, model)
    row.update(nnsight_check(model_type, model))
    if adapter:  # last: booting a bridge rewires the model's module tree
        row["tl"] = bridge_check(model_type, class_name, model)
    return row


def first_line(error, limit=240):
    return str(error).split("\n")[0][:limit]


def nnsight_check(model_type, model):
    """The nnsight path's columns (``nnsight``, ``sublayers``, ``heads``, ``verdict``) from
    ``lens_plugins.core.verification.verify``."""
    from lens_plugins.core import architectures, verification

    try:
        spec = architectures.resolve(model)
        verdict = verification.verify(model, spec)
    except Exception as error:
        return dict(nnsight="refused", sublayers="-", heads="-", verdict=f"{type(error).__name__}: {first_line(error)}")
    if verdict["refused"] and "the verification forward failed" in verdict["refused"]:
        # the model's own forward fails on the tiny config: no verdict on the lens either way
        return dict(nnsight="forward failed", sublayers="-", heads="-", verdict=verdict["refused"].split(": ", 1)[-1])
    if verdict["refused"]:
        return dict(nnsight="refused", sublayers="-", heads="-", verdict=verdict["refused"].split(": ", 1)[-1])
    spec = verdict["spec"]
    refused = spec.get("sublayers_refused") or ("attention and MLP add the residual inside the module"
                                                if spec.get("adds_residual") else None)
    heads = spec.get("heads_refused") or refused or (None if spec.get("o_proj") else "no output projection found")
    notes = [f"sublayers: {refused}"] if refused else []
    if heads and not refused:
        notes.append(f"heads: {heads}")
    source = "table" if model_type in architectures.ARCHITECTURES else "discovered"
    return dict(nnsight=f"verified ({source})", sublayers="no" if refused else "yes",
                heads="no" if heads else "yes", verdict="; ".join(notes) or "verified")


def tiny_tokenizer(vocab):
    """A word-level tokenizer of ``vocab`` ids built in memory (``<pad>``, ``<s>``, ``</s>`` as the tiny
    configs number them): a bridge boots with a tokenizer, and none is fetched."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<pad>", add_bos_token=True)
    tokenizer.init_kwargs["name_or_path"] = "tiny"  # TransformerLens reads it (and reloads nothing: BOS is added)
    return tokenizer


def bridge_check(model_type, class_name, model):
    """The TransformerLens column: ``model`` booted as a ``TransformerBridge`` (TransformerLens's adapter for
    ``class_name``) and checked by the TransformerLens backend's own first-use verification
    (``lens_plugins.backends.transformer_lens.verification``), the check every lens on a bridge runs first:
    every residual row against the wrapped model's ``output_hidden_states``, the last row decoded by
    ``decoder_for(bridge)`` against the model's logits (a final norm convention fitted where the norm's class
    does not tell it), the sublayer hooks adding up block by block, and the per-head writes direct logit
    attribution splits (``cache_parts``) summing to each attention write. Returns ``verified`` (with what was
    fitted, or what sublayers or heads refused), or what failed: the adapter, the bridge's forward, or the
    mismatch."""
    import importlib

    from transformer_lens.model_bridge import TransformerBridge

    tl_verification = importlib.import_module("lens_plugins.backends.transformer_lens.verification")
    tl_attribution = importlib.import_module("lens_plugins.backends.transformer_lens.attribution")
    vocab = model.get_output_embeddings().weight.shape[0]
    model.config.architectures = [class_name]  # as a checkpoint's config names it: the adapter is chosen by it
    # TransformerLens 4.3 boots a multimodal adapter by running `pip install torchvision` into this interpreter's
    # environment when torchvision is missing (helpers._ensure_torchvision): never here. The processor it would
    # load is best-effort and unused (the probe passes token ids).
    helpers = importlib.import_module("transformer_lens.model_bridge.sources.transformers.helpers")
    helpers._ensure_torchvision = lambda: False
    try:
        bridge = TransformerBridge.boot_transformers(f"tiny-{model_type}", hf_model=model,
                                                     tokenizer=tiny_tokenizer(vocab)).eval()
    except Exception as error:
        return f"adapter failed: {type(error).__name__}: {first_line(error, 200)}"
    verdict = tl_verification.verify(bridge)
    refused = verdict["refused"]
    if refused:
        if "the verification forward failed" in refused:
            return f"forward failed: the bridge's forward {first_line(refused.split('failed ', 1)[1], 200)}"
        reason = refused.split(": ", 1)[1].split(". Its rows or decoder")[0]  # the remedy every refusal ends with
        return f"refused: {first_line(reason, 200)}"
    notes = []
    if verdict["norm"]:
        notes.append("final norm fitted ({norm_kind}{one_plus}, eps {norm_eps:g})".format(
            one_plus=", 1 + w" if verdict["norm"]["norm_one_plus"] else "", **verdict["norm"]))
    if verdict["sublayers"]:
        notes.append(f"sublayers: {verdict['sublayers']}")
    else:
        heads = tl_verification.heads_problem(bridge, tl_attribution.cache_parts)
        if heads:
            notes.append(f"heads: {heads}")
    return "; ".join(["verified"] + notes)


def families():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())


def cell(text):
    """A table cell. The size of a mismatch varies in its last digits across CPUs and thread counts; the page
    states that it is beyond the tolerance, so the page is the same wherever the suite regenerates it."""
    text = re.sub(r"by \d\.\d+e[+-]\d+(?: \(relative\)|, relative)", "beyond the tolerance", text)
    return text.replace("|", "\\|").replace("\n", " ")


def transformer_lens_version():
    try:
        from importlib.metadata import version

        return ".".join(version("transformer-lens").split(".")[:2])
    except Exception:
        return "(not installed)"


def render(rows):
    import transformers

    verified = [r for r in rows if r["nnsight"].startswith("verified")]
    tl_adapter = [r for r in rows if r["tl"] != "no adapter"]
    tl_built = [r for r in tl_adapter if r["tl"] != "not built"]
    tl_verified = [r for r in tl_built if r["tl"].startswith("verified")]
    tl_version = transformer_lens_version()
    special = [r for r in rows if r["kind"] != "dense"]
    by_kind = ", ".join(f"{k}: {sum(r in verified for r in special if r['kind'] == k)} of "
                        f"{sum(r['kind'] == k for r in special)}" for k in ("MoE", "hybrid", "MoE + hybrid"))
    lines = [
        "# Architectures",
        "",
        "<!-- Generated by tools/architectures_coverage.py; tests/test_architectures_coverage.py checks it is current. -->",
        "",
        f"Measured, not claimed: every causal-LM family registered in transformers {transformers.__version__} "
        f"(`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, {len(rows)} families) built as a tiny random model (2 layers, width "
        "64, seeded, every norm parameter and bias perturbed) and checked by `lens_plugins.core.verification`: "
        "every residual row against `output_hidden_states`, the decoded last row against the model's own "
        "logits, sublayer writes summing to the residual, per-head writes summing to the attention write.",
        "",
        f"**{len(verified)} of {len(rows)} families verified** on the nnsight path "
        f"({sum(r['sublayers'] == 'yes' for r in verified)} with sublayer rows, "
        f"{sum(r['heads'] == 'yes' for r in verified)} with direct logit attribution by head). "
        f"Mixture-of-experts and hybrid (state-space, linear-attention or convolutional mixers) families: "
        f"{sum(r in verified for r in special)} of {len(special)} verified "
        f"({by_kind}); "
        "every other family is listed with the reason.",
        "",
        f"Of the {len(rows) - len(verified)} others, {sum(r['nnsight'] == 'refused' for r in rows)} are refused by the "
        "verification (the mismatch named: a prediction head with a transform before the unembedding as in BERT, "
        "a residual that is not one stream as in Gemma 3n, no block list found), "
        f"{sum(r['nnsight'] == 'not built' for r in rows)} could not be built tiny from their config by this script, "
        f"and {sum(r['nnsight'] == 'forward failed' for r in rows)} built but their own forward failed on the tiny "
        "config (no verdict either way: these are gaps in the script's configs, not verdicts on the lens).",
        "",
        "A model is verified the same way on first use (one forward of 5 tokens, cached per model class); a "
        "family that fails is refused before any lens runs, with the mismatch named. `table` marks the 16 "
        "families with an explicit entry in `lens_plugins.core.architectures.ARCHITECTURES`; `discovered` ones "
        "are found from the module tree and config (`lens_plugins.core.discovery`).",
        "",
        f"**TransformerLens bridge: {len(tl_verified)} of {len(tl_built)} families verified** "
        f"({len(tl_adapter)} families have a TransformerLens {tl_version} adapter, {len(tl_built)} of them built "
        f"here; {sum(r['tl'].startswith('verified') and 'sublayers:' not in r['tl'] and 'heads:' not in r['tl'] for r in rows)} "
        "with sublayer rows and direct logit attribution by head as well). The same tiny model is booted as a "
        "`TransformerBridge` and checked by the verification the TransformerLens backend runs on first use "
        "(`lens_plugins.backends.transformer_lens.verification`, before any lens reads a model of that class): "
        "every residual row against the wrapped model's `output_hidden_states`, the last row decoded by "
        "`decoder_for(bridge)` against the model's logits (a final norm's `w` or `1 + w` convention fitted where "
        "its class name does not tell), the sublayer hooks (`hook_resid_mid`, `hook_attn_out`, `hook_mlp_out`) "
        "adding up block by block, and the per-head writes of direct logit attribution (`hook_z` through `W_O`) "
        "summing to each attention write. A bridge that fails the first two is refused; one that fails the "
        "sublayer or head check has only sublayer rows or attribution refused, with the reason. The `TL bridge` "
        "column gives the verdict, or what failed: the adapter (`adapter failed`), the bridge's own forward "
        "(`forward failed`), or the mismatch (`refused`); `no adapter` where TransformerLens has none for the "
        "class.",
        "",
        "| family | class | kind | nnsight | TL bridge | sublayers | DLA by head | verdict or reason refused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = cell(r["verdict"]).split(". Pass the module paths by hand")[0]  # the remedy every refusal ends with
        lines.append(f"| {r['family']} | {r['cls']} | {r['kind']} | {r['nnsight']} | {cell(r['tl'])} | {r['sublayers']} | "
                     f"{r['heads']} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/architectures.md is not current")
    parser.add_argument("--only", nargs="*", help="model_types to run (prints rows, writes nothing)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    tl_classes = transformer_lens_families()
    rows = []
    for model_type, class_name in families():
        if args.only and model_type not in args.only:
            continue
        rows.append(check(model_type, class_name, tl_classes))
        print(f"{model_type:28s} {rows[-1]['nnsight']:22s} {rows[-1]['verdict'][:100]} | TL: {rows[-1]['tl'][:150]}",
              file=sys.stderr, flush=True)
    if args.only:
        return 0
    text = render(rows)
    if args.check:
        current = DOC.read_text() if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is not current: run python tools/architectures_coverage.py", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
