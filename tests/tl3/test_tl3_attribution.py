"""Direct logit attribution on HookedTransformer (TransformerLens 3.9) caches: raw and processed weights,
head results from ``hook_z @ W_O`` and from ``hook_result``, compared with the model's own logits and with
an nnsight trace of the same Hugging Face weights. nnsight lives in the main venv only, so that side runs
there in a subprocess (as ``test_tl3_bridge_parity`` does) and comes back as a ``.pt`` file."""

import os
import subprocess
import textwrap
import warnings

import pytest
import torch

import lens_plugins as lp
from lens_plugins.models.hooked_transformer import hooked_transformer_from_hf
from test_tl3_bridge_parity import HERE, REPO, main_python
from tiny_models import random_tokens, tiny_model

TOL = 1e-4
TARGET, DISTRACTOR = 17, 42
RAW = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
FAMILIES = ("gpt2", "llama")
NNSIGHT_SIDE = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from lens_plugins.core.trace import attribution as trace_attribution, reader as trace_reader
    from lens_plugins.backends import nnsight as lpn
    from lens_plugins.methods.attribution import result_from_saved
    from lens_plugins.models import default_model_dir, load_hf_model
    from tiny_models import random_tokens, tiny_model

    tokenizer = load_hf_model(default_model_dir())[1]
    out = {}
    for family in sys.argv[3:]:
        model = lpn.wrap_model(tiny_model(family, optional_biases=False), tokenizer)
        with model.trace(random_tokens()):
            saved = trace_attribution.attribution(model, 17, 42)
        dla = result_from_saved(saved, tokenizer, by="head")
        out[family] = {name: getattr(dla, name) for name in ("embed", "heads", "attn", "mlp", "constant", "values")}
    torch.save(out, sys.argv[2])
""")


@pytest.fixture(scope="module")
def nnsight_side(tmp_path_factory):
    """The nnsight attribution of each tiny family, computed by the main venv."""
    out = tmp_path_factory.mktemp("nnsight") / "attribution.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(main_python()), "-c", NNSIGHT_SIDE, str(HERE.parent), str(out), *FAMILIES],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"the nnsight side failed in {main_python()} (exit {proc.returncode}); run `make test` to "
                    f"rebuild the venvs.\nstderr tail:\n{proc.stderr[-3000:]}")
    return torch.load(out, weights_only=False)


def hooked(family, tokenizer, flags, attn_result):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = hooked_transformer_from_hf(tiny_model(family, optional_biases=False), tokenizer, **flags)
    model.set_use_attn_result(attn_result)
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flags", [RAW, {}], ids=["raw", "folded"])
@pytest.mark.parametrize("attn_result", [False, True], ids=["hook_z", "hook_result"])
def test_hooked_transformer_attribution_is_exact_and_matches_nnsight(family, flags, attn_result, nnsight_side, smollm2_tokenizer):
    tokens = random_tokens()
    model = hooked(family, smollm2_tokenizer, flags, attn_result)
    names = lp.transformer_lens.hook_filter(model, attribution=True)
    names += [f"blocks.{layer}.attn.hook_result" for layer in range(model.cfg.n_layers)] if attn_result else []
    _, cache = model.run_with_cache(tokens, names_filter=names)
    dla = cache.lens.attribution(TARGET, DISTRACTOR, by="head")
    with torch.no_grad():
        logits = tiny_model(family, optional_biases=False)(tokens).logits[:, -1]
    assert dla.error.max() <= TOL, dla.report()
    assert (dla.model_value - (logits[:, TARGET] - logits[:, DISTRACTOR])).abs().max() <= TOL
    assert (dla.heads.sum(-1) + dla.head_bias - dla.attn).abs().max() <= TOL

    traced = nnsight_side[family]
    # Folding and centring move writes between components (a centred W_E, b_V folded into b_O) and
    # between them and the constant; the total does not move, and on raw weights nothing does.
    torch.testing.assert_close(dla.values.sum(-1) + dla.constant, traced["values"].sum(-1) + traced["constant"], atol=TOL, rtol=0)
    if flags is RAW:
        for name in ("embed", "heads", "attn", "mlp", "constant"):
            torch.testing.assert_close(getattr(dla, name), traced[name], atol=TOL, rtol=0, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_hooked_transformer_sublayer_rows(family, smollm2_tokenizer):
    """``hook_resid_mid`` rows between the layers, and the last row is the model's own prediction."""
    tokens = random_tokens()
    model = hooked(family, smollm2_tokenizer, {}, False)
    _, cache = model.run_with_cache(tokens, names_filter=lp.transformer_lens.hook_filter(model, sublayers=True))
    stack, labels = cache.lens.stack(sublayers=True)
    assert labels == ["embed", "0_attn", "0_mlp", "1_attn", "1_mlp", "2_attn", "2_mlp"]
    assert torch.equal(stack[labels.index("1_attn")], cache["blocks.1.hook_resid_mid"])
    result = cache.lens.logit_lens(tokens=tokens, sublayers=True, top_k=1)
    with torch.no_grad():
        reference = tiny_model(family, optional_biases=False)(tokens).logits.log_softmax(-1)
    torch.testing.assert_close(result.top_logprobs[-1, ..., 0], reference.max(-1).values, atol=TOL, rtol=0)
