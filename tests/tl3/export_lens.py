"""Write the logit lens of SmolLM2 on a fixed prompt to a ``.pt`` file, from one TransformerLens backend.

TransformerLens 3.9 (``HookedTransformer``) and 4.x (``TransformerBridge``) cannot share a venv, so
the cross-version test runs this script with the other venv's python and compares the file with what
it computes itself. Both sides build the token ids the same way (``PROMPT`` with the tokenizer's BOS
id prepended by hand, no ``to_tokens``), so they decode exactly the same tensor.

    .venv/bin/python tests/tl3/export_lens.py --backend bridge --out lens_bridge.pt
    .venv-tl3/bin/python tests/tl3/export_lens.py --backend hooked --out lens_hooked.pt

The file holds ``{"meta": {...}, "tokens": ids, "variants": {name: {field: tensor}}}``; ``meta`` names
the TransformerLens version that produced it, ``variants`` one entry per model setting (bridge: raw and
compatibility mode; hooked: fold_ln on and off).
"""

import argparse
import importlib.metadata
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

PROMPT = "The capital of France is"
TARGETS = (" Paris", " London")
TOP_K = 10
# Everything the comparison checks; the names are LensResult fields.
FIELDS = (
    "top_ids", "top_logprobs", "entropy", "kl_final_row", "kl_row_final", "final_top1", "final_top1_logprob",
    "final_top1_rank", "next_token_logprob", "next_token_rank", "target_logprobs", "target_ranks",
)


def prompt_tokens(tokenizer) -> torch.Tensor:
    """``[1, seq]``: BOS then ``PROMPT`` without special tokens, independent of any backend's ``to_tokens``."""
    if tokenizer.bos_token_id is None:
        raise ValueError("the tokenizer has no BOS token")
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    return torch.tensor([[tokenizer.bos_token_id, *ids]], dtype=torch.long)


def lens_record(model, tokens: torch.Tensor) -> dict:
    """The lens tensors of ``model`` on ``tokens``, plus the model's own final log-probs."""
    import lens_plugins as lp

    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(model))
    result = cache.lens.logit_lens(tokens=tokens, top_k=TOP_K, targets=list(TARGETS))
    record = {name: getattr(result, name).detach().cpu().clone() for name in FIELDS}
    record["labels"] = list(result.labels)
    record["target_ids"] = result.target_ids.clone()
    record["model_logprobs"] = logits.detach().float().log_softmax(-1).cpu()
    return record


def bridge_variants(hf_model, tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    from lens_plugins.models import DEFAULT_MODEL_NAME, default_model_dir, load_hf_model

    yield "bridge_raw", TransformerBridge.boot_transformers(DEFAULT_MODEL_NAME, hf_model=hf_model, tokenizer=tokenizer).eval()
    # Booting rewires the HF module tree, so the compatibility-mode bridge gets its own copy.
    hf_copy, tokenizer_copy = load_hf_model(default_model_dir())
    bridge = TransformerBridge.boot_transformers(DEFAULT_MODEL_NAME, hf_model=hf_copy, tokenizer=tokenizer_copy).eval()
    bridge.enable_compatibility_mode()
    yield "bridge_compat", bridge


def hooked_variants(hf_model, tokenizer):
    from lens_plugins.models.hooked_transformer import hooked_transformer_from_hf

    yield "hooked_fold_ln", hooked_transformer_from_hf(hf_model, tokenizer, fold_ln=True)
    yield "hooked_no_processing", hooked_transformer_from_hf(
        hf_model, tokenizer, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)


def export(backend: str) -> dict:
    from lens_plugins.models import default_model_dir, load_hf_model

    hf_model, tokenizer = load_hf_model(default_model_dir())
    tokens = prompt_tokens(tokenizer)
    variants = bridge_variants if backend == "bridge" else hooked_variants
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        records = {name: lens_record(model, tokens) for name, model in variants(hf_model, tokenizer)}
    meta = {
        "backend": backend,
        "transformer_lens": importlib.metadata.version("transformer-lens"),
        "torch": torch.__version__,
        "python": sys.executable,
        "prompt": PROMPT,
        "targets": list(TARGETS),
        "top_k": TOP_K,
    }
    return {"meta": meta, "tokens": tokens, "variants": records}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("bridge", "hooked"), required=True,
                        help="bridge: TransformerBridge (transformer-lens 4.x); hooked: HookedTransformer (3.9)")
    parser.add_argument("--out", required=True, help="the .pt file to write")
    args = parser.parse_args(argv)
    torch.save(export(args.backend), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
