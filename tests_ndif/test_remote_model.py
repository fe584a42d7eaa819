"""``lp.nnsight.remote_model``: a model for NDIF without loading it, with a local directory as the repo id."""

import torch

import lens_plugins as lp
from helpers import PROMPT


def test_remote_model_loads_nothing_and_runs_remotely(ndif, smollm2_dir):
    model = lp.nnsight.remote_model(smollm2_dir)
    assert {p.device.type for p in model._module.parameters()} == {"meta"}  # no weights here
    assert model.tokenizer.name_or_path == smollm2_dir
    result = lp.nnsight.run_logit_lens(model, PROMPT, remote=True, top_k=3, targets=[" Paris"])
    assert {p.device.type for p in model._module.parameters()} == {"meta"}  # still none after a remote run
    assert result.rank_of(" Paris")[-1, 0, -1] == 1
    local = lp.nnsight.run_logit_lens(model, PROMPT, top_k=3, targets=[" Paris"])  # loads the weights now
    assert torch.equal(result.top_ids, local.top_ids) and torch.equal(result.top_logprobs, local.top_logprobs)
