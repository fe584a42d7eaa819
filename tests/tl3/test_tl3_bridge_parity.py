"""The same lens numbers from a HookedTransformer cache (TransformerLens 3.9, this venv) and a
TransformerBridge cache (TransformerLens 4.x, the main venv) of the same SmolLM2 weights.

The two versions cannot share a venv, so the bridge side runs in a subprocess with the main venv's
python (``export_lens.py --backend bridge``) and this test compares its file with the lens it computes
on its own HookedTransformers. The comparison is not optional: without the main venv the test fails.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export_lens import FIELDS, PROMPT, TARGETS, TOP_K, lens_record, prompt_tokens
from lens_plugins.backends import transformer_lens as tl_adapter

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ATOL = 1e-4
# The two sides are different float32 programs (HookedTransformer's kernels and processed weights, the HF
# model under the bridge), so their residual streams differ by float32 rounding accumulated over 30 blocks.
# A divergence of D nats is a difference of sums whose terms reach D (sum_v q_v (log q_v - log p_v)), so it
# inherits that relative rounding times D: divergences may move by 1e-4 of themselves (about 100 float32 ulps
# at 200 nats); other statistics by 1e-5 of themselves; everything below 1 nat is held to ATOL.
RTOL = 1e-5
RTOL_DIVERGENCE = 1e-4
# Ranks deep in the vocabulary may differ where another token's log-prob is within this of the target's.
TIE = 2 * ATOL


def main_python() -> Path:
    return Path(os.environ.get("LENS_PLUGINS_MAIN_PYTHON", REPO / ".venv" / "bin" / "python"))


@pytest.fixture(scope="session")
def bridge_export(tmp_path_factory):
    python = main_python()
    if not python.exists():
        pytest.fail(
            f"the TransformerLens 4.x side of this comparison needs the main venv's python at {python}, which "
            "does not exist: run `make test` (it creates .venv and .venv-tl3), or point "
            "LENS_PLUGINS_MAIN_PYTHON at a python with transformer-lens 4.x and lens_plugins installed"
        )
    out = tmp_path_factory.mktemp("bridge") / "lens_bridge.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # the main venv must see its own site-packages only
    proc = subprocess.run(
        [str(python), str(HERE / "export_lens.py"), "--backend", "bridge", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    if proc.returncode != 0:
        pytest.fail(f"{python} export_lens.py --backend bridge failed (exit {proc.returncode}); run `make test` "
                    f"to rebuild the venvs if they are stale.\nstderr tail:\n{proc.stderr[-3000:]}")
    data = torch.load(out, weights_only=False)
    major = int(data["meta"]["transformer_lens"].split(".")[0])
    assert major >= 4, f"the bridge side ran transformer-lens {data['meta']['transformer_lens']}, not 4.x ({python})"
    return data


@pytest.fixture(scope="session")
def hooked_records(smollm2_hf, smollm2_ht, smollm2_ht_unprocessed):
    tokens = prompt_tokens(smollm2_hf[1])
    return tokens, {"hooked_fold_ln": (smollm2_ht, lens_record(smollm2_ht, tokens)),
                    "hooked_unprocessed": (smollm2_ht_unprocessed, lens_record(smollm2_ht_unprocessed, tokens))}


def test_the_export_is_what_this_side_computes_too(bridge_export, hooked_records, smollm2_tokenizer):
    import importlib.metadata

    meta = bridge_export["meta"]
    assert importlib.metadata.version("transformer-lens").startswith("3.")  # this side: HookedTransformer
    assert (meta["prompt"], tuple(meta["targets"]), meta["top_k"]) == (PROMPT, TARGETS, TOP_K)
    tokens, _ = hooked_records
    # Same ids, BOS included, tokenized independently in each venv.
    assert tokens[0, 0].item() == smollm2_tokenizer.bos_token_id
    assert torch.equal(bridge_export["tokens"], tokens)
    assert set(bridge_export["variants"]) == {"bridge_raw", "bridge_compat"}


def tie_aware_rank_check(name, ours, theirs, logprobs_of, target_ids_of):
    """Ranks must agree except where a near-tie makes them ambiguous: there, they may differ by at most
    the number of other tokens whose log-prob is within ``TIE`` of the target's."""
    mismatched = (ours != theirs).nonzero().tolist()
    for index in mismatched:
        row_logprobs = logprobs_of(index)
        target = target_ids_of(index)
        near = ((row_logprobs - row_logprobs[target]).abs() <= TIE).sum().item() - 1
        gap = abs(ours[tuple(index)].item() - theirs[tuple(index)].item())
        assert gap <= near, (f"{name} at {index}: rank {ours[tuple(index)].item()} vs {theirs[tuple(index)].item()}, "
                             f"but only {near} tokens are within {TIE} of the target")
    return len(mismatched)


@pytest.mark.parametrize("bridge_name", ["bridge_raw", "bridge_compat"])
@pytest.mark.parametrize("hooked_name", ["hooked_fold_ln", "hooked_unprocessed"])
def test_hooked_transformer_and_bridge_give_the_same_lens(bridge_export, hooked_records, bridge_name, hooked_name):
    theirs = bridge_export["variants"][bridge_name]
    tokens, hooked = hooked_records
    model, ours = hooked[hooked_name]
    assert ours["labels"] == theirs["labels"]
    assert len(ours["labels"]) == model.cfg.n_layers + 1

    # The models themselves agree ...
    torch.testing.assert_close(ours["model_logprobs"], theirs["model_logprobs"], atol=ATOL, rtol=0)
    # ... and so does every lens statistic, at every row and position.
    for field in ("top_ids", "final_top1"):
        assert torch.equal(ours[field], theirs[field]), f"{field} differs between {hooked_name} and {bridge_name}"
    for field in FIELDS:
        if ours[field].is_floating_point():
            rtol = RTOL_DIVERGENCE if field.startswith(("kl_", "js_")) else RTOL
            torch.testing.assert_close(ours[field], theirs[field], atol=ATOL, rtol=rtol, equal_nan=True,
                                       msg=lambda m, f=field: f"{f}: {m}")

    # Ranks: exact unless a near-tie makes them ambiguous (checked against this side's full distribution).
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=tl_adapter.hook_filter(model))
    stack, _ = tl_adapter.residual_stack(cache)
    decoder = tl_adapter.decoder_for(model)

    def logprobs_of(index):
        row, batch, pos = index[:3]
        return decoder.logits(stack[row, batch, pos]).log_softmax(-1)

    final_top1 = ours["final_top1"]
    next_ids = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # the last position has no next token (rank -1)
    assert torch.equal(ours["target_ids"], theirs["target_ids"])
    target_ids = ours["target_ids"].tolist()
    n = tie_aware_rank_check("final_top1_rank", ours["final_top1_rank"], theirs["final_top1_rank"], logprobs_of,
                             lambda i: final_top1[i[1], i[2]].item())
    n += tie_aware_rank_check("next_token_rank", ours["next_token_rank"], theirs["next_token_rank"], logprobs_of,
                              lambda i: next_ids[i[1], i[2]].item())
    n += tie_aware_rank_check("target_ranks", ours["target_ranks"], theirs["target_ranks"], logprobs_of,
                              lambda i: target_ids[i[3]])
    total = sum(ours[f].numel() for f in ("final_top1_rank", "next_token_rank", "target_ranks"))
    assert n <= total // 100, f"{n} of {total} ranks differ: more than near-ties explain"
