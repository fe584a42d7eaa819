"""Against a real NDIF server: the issue-27 methods whose model runs where the model is. A cross-model
Patchscope whose target model is remote, the subspace ablation of a causal check and the sublayer
substitution each equal the same call run locally.

SmolLM2 reads itself across rows (the only model the server has): the target is a second ``remote_model`` of
the same files, which is what ``target_model=`` sees of any other model.
"""

import pytest
import torch

import lens_plugins as lp
from helpers import PROMPT, assert_identical
from lens_plugins.core import causal_basis as arithmetic

TEXTS = ["The capital of France is Paris, and the capital of Italy is Rome. Spain's capital is Madrid, and "
         "Portugal's is Lisbon.", "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints five"]


@pytest.fixture(scope="module")
def target(ndif, smollm2_dir):
    model = lp.nnsight.remote_model(smollm2_dir)
    model.dispatch()  # fit_mapping reads the target's weights here (on the meta device until dispatched)
    return model


def test_cross_model_patchscope_with_a_remote_target(model, target):
    """The map is fitted here (ridge: a few pairs); the Patchscope's source and target traces run on the
    server and equal the local ones bit for bit."""
    fitted = lp.fit_mapping(model, target, TEXTS, source_layers=[10, 20], target_layers=[5], ridge=1.0)
    kwargs = dict(layers=fitted.source_labels, target_layer="5_pre", mapping=fitted.mappings("5_pre"), top_k=3,
                  targets=[" Paris"], target_model=target)
    local = lp.nnsight.run_patchscope(model, PROMPT, **kwargs)
    remote = lp.nnsight.run_patchscope(model, PROMPT, remote=True, **kwargs)
    assert remote.labels == local.labels
    assert_identical(remote.top_ids, local.top_ids, "top_ids")
    assert_identical(remote.top_logprobs, local.top_logprobs, "top_logprobs")
    here = lp.cross_model_scores(model, target, fitted, [PROMPT])
    there = lp.cross_model_scores(model, target, fitted, [PROMPT], remote=True)
    assert torch.equal(there.precision_at_1, here.precision_at_1)


def test_subspace_ablation_on_the_server(model):
    """``run_ablation`` ships the basis and its mean as tensors; the clean state and the model's effect come
    back equal to the local trace's, and so does the whole experiment's model effect."""
    generator = torch.Generator().manual_seed(0)
    directions = arithmetic.random_basis(2, 576, generator)
    mean = torch.randn(576, generator=generator)
    tokens = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    here = lp.nnsight.run_ablation(model, tokens, "15_pre", directions, mean)
    there = lp.nnsight.run_ablation(model, tokens, "15_pre", directions, mean, remote=True)
    assert_identical(there["hidden"], here["hidden"], "hidden")
    assert_identical(there["effect"], here["effect"], "effect")
    assert float(here["effect"][1:].mean()) > 0 and float(here["effect"][0]) == 0.0
    basis = lp.CausalBasis(label="15_pre", basis=directions, gains=torch.zeros(2), mean=mean, tokens=1)
    bases = {"logit lens": (lp.LogitLens(), basis)}
    local = lp.subspace_ablation(model, bases, [PROMPT])
    remote = lp.subspace_ablation(model, bases, [PROMPT], remote=True)
    assert torch.equal(remote.model_effect, local.model_effect)


def test_sublayer_substitution_on_the_server(model):
    """``run_substitution`` writes each sublayer's shortcut into its output on the server: the final top-1 and
    the KL per position equal the local trace's."""
    shortcuts = lp.fit_sublayer_shortcuts(model, TEXTS, layers=[3, 20], seq_len=16, max_blocks=4, ridge=1.0)
    tokens = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    plan = [(3, "attn"), (3, "mlp"), (20, "mlp")]
    weight = torch.stack([shortcuts.map(*p)[0] for p in plan])
    bias = torch.stack([shortcuts.map(*p)[1] for p in plan])
    here = lp.nnsight.run_substitution(model, tokens, plan, weight, bias)
    there = lp.nnsight.run_substitution(model, tokens, plan, weight, bias, remote=True)
    assert_identical(there["top1"], here["top1"], "top1")
    assert_identical(there["kl"], here["kl"], "kl")
    assert float(here["kl"][:, 1:].mean()) > 0  # the substitutions changed the output
