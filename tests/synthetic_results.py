"""Results built from random logits over a small vocabulary of hostile token strings, no model needed.

Every statistic is computed from one full ``[row, batch, seq, vocab]`` logit tensor with plain torch, so a
figure test can compare what a figure shows with numbers that are consistent (ranks, top-k and agreement
with the final row all come from the same logits).
"""

import torch

from lens_plugins.methods.attention import AttentionResult
from lens_plugins.methods.result import LensResult

HOSTILE = [
    "<script>alert(1)</script>", "</script>", '"double" \'single\'', "line\nbreak", "\ufffd", "שלום", "مرحبا",
    " Paris", "<|im_start|>", "&amp;", "tab\there", "a\rb", "<b>bold</b>", " ", "\x00nul", "plain",
]


def lens_result(batch: int = 2, rows: int = 7, seq: int = 8, k: int = 3, seed: int = 0, strings=HOSTILE) -> LensResult:
    g = torch.Generator().manual_seed(seed)
    vocab = len(strings)
    logits = torch.randn(rows, batch, seq, vocab, generator=g) * 2.5
    logp = logits.log_softmax(-1)
    top = logp.topk(k, dim=-1)
    final = top.indices[-1, ..., 0]
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    # Let the model be right at every other position, so the top axis has marked and unmarked tokens.
    tokens[:, 1::2] = final[:, 0:-1:2]
    tokens[0] = torch.arange(seq) % vocab  # every hostile string appears as an input token of prompt 0
    mask = torch.ones(batch, seq, dtype=torch.long)

    def rank(ids):  # ids [batch, seq] or broadcastable; 1 + #strictly larger logits
        chosen = logits.gather(-1, ids.expand(rows, batch, seq).unsqueeze(-1))
        return 1 + (logits > chosen).sum(-1)

    nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
    next_rank = rank(nxt)
    next_rank[..., -1] = -1
    next_logprob = logp.gather(-1, nxt.expand(rows, batch, seq).unsqueeze(-1)).squeeze(-1)
    next_logprob[..., -1] = float("nan")
    targets = torch.tensor([7, 0])
    sets = [[7, 5], [1, 2, 3]]
    p_final = logp[-1].exp()
    return LensResult(
        labels=["embed"] + [f"{i}_pre" for i in range(1, rows - 1)] + [f"{rows - 2}_post"],
        positions=list(range(seq)), token_ids=tokens, attention_mask=mask,
        vocab_strings=dict(enumerate(strings)), reductions=["top_k", "entropy", "kl_final_row", "final_top1", "next_token"],
        log_partition=logits.logsumexp(-1),
        target_names=[strings[i] for i in targets.tolist()], target_ids=targets,
        target_logprobs=logp[..., targets], target_ranks=torch.stack([rank(torch.tensor(t)) for t in targets.tolist()], -1),
        set_names=["paris", "abc"], set_members=[[strings[i] for i in s] for s in sets],
        set_logprobs=torch.stack([logp[..., s].logsumexp(-1) for s in sets], -1),
        set_ranks=torch.stack([torch.stack([rank(torch.tensor(i)) for i in s]).min(0).values for s in sets], -1),
        top_ids=top.indices, top_logprobs=top.values,
        entropy=-(logp.exp() * logp).sum(-1), kl_final_row=(p_final * (logp[-1] - logp)).sum(-1),
        final_top1=final, final_top1_logprob=logp.gather(-1, final.expand(rows, batch, seq).unsqueeze(-1)).squeeze(-1),
        final_top1_rank=rank(final), next_token_logprob=next_logprob, next_token_rank=next_rank,
    )


def attention_result(layers: int = 3, batch: int = 2, heads: int = 4, seq: int = 6, seed: int = 0, strings=HOSTILE) -> AttentionResult:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(layers, batch, heads, seq, seq, generator=g)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    patterns = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    tokens = torch.arange(batch * seq).reshape(batch, seq) % len(strings)
    return AttentionResult(layers=list(range(layers)), patterns=patterns, token_ids=tokens,
                           attention_mask=torch.ones(batch, seq, dtype=torch.long), vocab_strings=dict(enumerate(strings)))
