"""Surfaced, then overridden: exact answers on hand-built results, a loop-by-loop reference on random ones,
and the real model on both backends giving the same answer."""

import pandas as pd
import pytest
import torch
from synthetic_results import lens_result

import lens_plugins as lp
from lens_plugins.methods.result import LensResult
from lens_plugins.methods.surfaced import OUTCOMES, surfaced

VOCAB = ["T", "a", "b", "c", "d", "e"]  # token 0 is the target


def from_orders(orders, mask=None, k=3):
    """A ``LensResult`` whose row r, prompt b, position p ranks the vocabulary as ``orders[r][b][p]`` (best
    first; unlisted tokens after it, in id order): ranks, top-k and log-probs all follow from those logits."""
    rows, batch, n_pos = len(orders), len(orders[0]), len(orders[0][0])
    logits = torch.zeros(rows, batch, n_pos, len(VOCAB))
    for r in range(rows):
        for b in range(batch):
            for p in range(n_pos):
                order = list(orders[r][b][p]) + [t for t in range(len(VOCAB)) if t not in orders[r][b][p]]
                for place, token in enumerate(order):
                    logits[r, b, p, token] = -float(place)
    logp = logits.log_softmax(-1)
    top = logp.topk(k, dim=-1)
    ranks = 1 + (logits > logits[..., :1]).sum(-1, keepdim=True)
    mask = torch.ones(batch, n_pos, dtype=torch.long) if mask is None else mask
    return LensResult(
        labels=["embed"] + [f"{i}_pre" for i in range(1, rows - 1)] + [f"{rows - 2}_post"], positions=list(range(n_pos)),
        token_ids=torch.ones(batch, n_pos, dtype=torch.long), attention_mask=mask, vocab_strings=dict(enumerate(VOCAB)),
        reductions=["top_k"], log_partition=logits.logsumexp(-1), target_names=["T"], target_ids=torch.tensor([0]),
        target_logprobs=logp[..., :1], target_ranks=ranks, set_names=[], set_members=[],
        set_logprobs=torch.zeros(rows, batch, n_pos, 0), set_ranks=torch.zeros(rows, batch, n_pos, 0, dtype=torch.long),
        top_ids=top.indices, top_logprobs=top.values,
    )


# Six rows (embed .. 4_post); one position per prompt. Each prompt's story is in its comment.
T, A, B, C, D = 0, 1, 2, 3, 4
STORIES = [
    # 0: top-1 at rows 1-2, then 'c' takes over at row 3; the final top-1 is 'b' (not the overrider)
    [[A, B, C], [T, A], [T, A], [C, T], [C, A, T], [B, C, A, D, T]],
    # 1: never in the top-3 (rank 4 at best)
    [[A, B, C, T], [A, B, C, T], [B, A, C, T], [A, B, C, T], [A, C, B, T], [A, B, C, T]],
    # 2: top-1 at row 1, lost at row 2 to 'd', top-1 again at rows 4-5: kept, whatever happened before
    [[A, T], [T, A], [D, T], [A, B, T], [T], [T]],
    # 3: top-1 at row 1, lost at 2, top-1 again at row 3, lost for good at row 4 to 'a': the last loss counts
    [[B, T], [T], [D, T], [T, B], [A, T], [A, B, C, T]],
    # 4: in the top-3 at rows 2-3 (rank 2 at row 3: its best), never top-1, out of the top-3 at the end
    [[A, B, C, D], [A, B, C, T], [A, B, T], [A, T], [A, B, C, D], [A, B, C, D]],
]


def stories_result(mask=None):
    orders = [[[STORIES[b][r]] for b in range(len(STORIES))] for r in range(6)]
    return from_orders(orders, mask)


def test_hand_built_stories_give_the_known_answers():
    s = surfaced(stories_result(), "T")
    col = lambda name: getattr(s, name)[:, 0].tolist()
    assert [OUTCOMES[o] for o in col("outcome")] == ["overridden", "never", "kept", "overridden", "top_k"]
    assert col("first_top1") == [1, -1, 1, 1, -1]
    assert col("last_top1") == [2, -1, 5, 3, -1]
    assert col("lost_row") == [3, -1, -1, 4, -1]
    assert col("overrider_id") == [C, -1, -1, A, -1]
    assert col("final_top1_id") == [B, A, T, A, A]
    assert col("first_top_k") == [1, -1, 0, 0, 2]
    assert col("lost_top_k_row") == [5, -1, -1, 5, 4]
    assert col("best_rank") == [1, 4, 1, 1, 2]
    assert col("best_rank_row") == [1, 0, 1, 1, 3]
    assert col("final_rank") == [5, 4, 1, 4, 5]
    # The peak is the row of highest probability, which ties to the first row where the target is top-1 alone
    # (rows whose listed order is [T] alone have the same logits as [T, A]).
    assert col("peak_row") == [1, 0, 1, 1, 3]


def test_summary_row_counts_and_overriders_follow_the_stories():
    s = surfaced(stories_result(), "T")
    assert s.summary()["count"].to_dict() == {"never": 1, "top_k": 1, "overridden": 2, "kept": 1}
    counts = s.row_counts()
    assert counts["overridden"].tolist() == [0, 0, 0, 1, 1, 0]
    assert counts["first_top1"].tolist() == [0, 3, 0, 0, 0, 0]
    assert s.overriders() == [("c", 1), ("a", 1)]
    frame = s.to_dataframe()
    assert frame.loc[0, "lost_row"] == "3_pre" and frame.loc[0, "overrider"] == "c" and pd.isna(frame.loc[1, "lost_row"])


def test_padding_is_unscored_and_k_changes_only_the_top_k_test():
    mask = torch.tensor([[1], [0], [1], [1], [1]])
    s = surfaced(stories_result(mask), "T", k=1)
    assert [OUTCOMES[o] for o in s.outcome[:, 0].tolist()] == ["overridden", "unscored", "kept", "overridden", "never"]
    assert s.first_top1[1, 0] == -1 and s.lost_row[1, 0] == -1
    assert s.summary()["count"].sum() == 4
    wide = surfaced(stories_result(), "T", k=4)
    assert OUTCOMES[int(wide.outcome[1, 0])] == "top_k"  # rank 4 counts once k is 4


def reference(result, b, p, ranks, logprobs, k):
    """One prompt and position, row by row in plain Python: the definitions, written out."""
    r = ranks[:, b, p].tolist()
    lp_ = logprobs[:, b, p].tolist()
    top1 = [i for i, x in enumerate(r) if x == 1]
    in_k = [i for i, x in enumerate(r) if 1 <= x <= k]
    if r[-1] == 1:
        outcome, lost, overrider = "kept", -1, -1
    elif top1:
        lost = top1[-1] + 1
        outcome, overrider = "overridden", int(result.top_ids[lost, b, p, 0])
    else:
        outcome, lost, overrider = ("top_k" if in_k else "never"), -1, -1
    return {"outcome": outcome, "first_top1": top1[0] if top1 else -1, "first_top_k": in_k[0] if in_k else -1,
            "lost_row": lost, "overrider_id": overrider, "peak_row": max(range(len(lp_)), key=lambda i: (lp_[i], -i)),
            "best_rank": min(r), "lost_top_k_row": in_k[-1] + 1 if in_k and r[-1] > k else -1}


@pytest.mark.parametrize("seed", range(4))
def test_random_results_match_a_row_by_row_reference(seed):
    result = lens_result(batch=3, rows=9, seq=6, k=3, seed=seed)
    for targets, ranks, logprobs in ((" Paris", result.rank_of(" Paris"), result.logprob_of(" Paris")),
                                     (None, result.next_token_rank, result.next_token_logprob)):
        s = surfaced(result, targets, k=2)
        for b in range(3):
            for p in range(6):
                if ranks[-1, b, p] < 0:
                    assert OUTCOMES[int(s.outcome[b, p])] == "unscored"
                    continue
                expected = reference(result, b, p, ranks, logprobs, 2)
                got = {name: (OUTCOMES[int(s.outcome[b, p])] if name == "outcome" else int(getattr(s, name)[b, p]))
                       for name in expected}
                assert got == expected, (targets, b, p)


def test_one_target_per_prompt_and_the_errors():
    result = lens_result(batch=2, rows=5, seq=4)
    per_prompt = surfaced(result, [" Paris", "<script>alert(1)</script>"])
    assert torch.equal(per_prompt.target_ids[:, 0], torch.tensor([7, 0]))
    assert torch.equal(per_prompt.first_top1[0], surfaced(result, " Paris").first_top1[0])
    assert torch.equal(per_prompt.first_top1[1], surfaced(result, 0).first_top1[1])
    with pytest.raises(lp.LensError, match="3 targets for 2 prompts"):
        surfaced(result, [" Paris"] * 3)
    with pytest.raises(lp.LensError, match="targets=\\[...\\]"):
        surfaced(result, " Rome")
    with pytest.raises(lp.LensError, match="k must be at least 1"):
        surfaced(result, " Paris", k=0)


def test_figure_shows_the_tables():
    s = surfaced(stories_result(), "T")
    figure = s.plot()
    bars = {trace.name: list(trace.y) for trace in figure.data if trace.name}
    assert bars["overridden (lost) here"] == s.row_counts()["overridden"].tolist()
    assert list(figure.data[-1].y) == s.summary()["count"].tolist()
    assert "c (1)" in figure.layout.title.text


CAPITALS = [("The capital of France is", " Paris"), ("The capital of Italy is", " Rome"),
            ("The capital of Germany is", " Berlin"), ("The capital of Japan is", " Tokyo"),
            ("The capital of Spain is", " Madrid"), ("The capital of Egypt is", " Cairo")]


@pytest.mark.slow
def test_real_model_on_both_backends_agrees(smollm2_hf, smollm2_bridge):
    from lens_plugins.backends import nnsight as lpn

    prompts, answers = zip(*CAPITALS)
    kwargs = dict(targets=list(answers), positions=[-1], padding_side="left", top_k=5)
    tl = lp.transformer_lens.run_logit_lens(smollm2_bridge, list(prompts), **kwargs)
    nn = lpn.run_logit_lens(lpn.wrap_model(*smollm2_hf), list(prompts), **kwargs)
    a, b = surfaced(tl, list(answers)), surfaced(nn, list(answers))
    for name in ("outcome", "first_top1", "first_top_k", "last_top1", "lost_row", "overrider_id", "best_rank",
                 "final_rank", "final_top1_id", "target_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.final_prob, b.final_prob, atol=1e-4, rtol=0)
    # The model's own answer: the final rank is 1 exactly where the outcome is "kept", and the final top-1 is
    # the lens's top-1 at the last row (the model's prediction for the next token).
    assert torch.equal(a.outcome[:, 0] == OUTCOMES.index("kept"), a.final_rank[:, 0] == 1)
    assert torch.equal(a.final_top1_id[:, 0], tl.top_ids[-1, :, 0, 0])
    assert (a.outcome[:, 0] != OUTCOMES.index("unscored")).all()
