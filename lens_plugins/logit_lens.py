"""From a residual stack to a ``LensResult``: the backend-free middle of every adapter.

An adapter's job ends at ``(stack, labels, decoder, token_ids, tokenizer)``; what happens next
is the same for TransformerLens and nnsight: choose positions, build the per-token targets (the
actual next token, then the user's), stream the decoder over the stack, and label the result.
``prepare`` and ``assemble`` are split so that a remote trace can run the streamed part on the server.
"""

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins import readout, tokens
from lens_plugins.decoder import Decoder
from lens_plugins.result import LensResult
from lens_plugins.typecheck import typechecked

DEFAULT_VOCAB_CHUNK = 4096
DEFAULT_TOKEN_CHUNK = 256


@dataclass(frozen=True)
class LensRequest:
    """Everything about a lens call that is known before any activation is read."""

    positions: list[int]
    target_names: list[str]
    target_ids: list[int]
    per_token_targets: Int[Tensor, "token n_targets"]  # next token, then the user's targets


def resolve_positions(positions: Optional[Sequence[int]], seq_len: int) -> list[int]:
    """Absolute, de-duplicated positions in prompt order; ``None`` means all of them."""
    if seq_len == 0:
        raise ValueError("the prompt is empty: there is no position to decode")
    if positions is None:
        return list(range(seq_len))
    if isinstance(positions, int):
        positions = [positions]
    resolved = []
    for pos in positions:
        if not -seq_len <= pos < seq_len:
            raise IndexError(f"position {pos} is out of range for a prompt of {seq_len} tokens "
                             f"(valid: {-seq_len} .. {seq_len - 1})")
        if pos % seq_len not in resolved:
            resolved.append(pos % seq_len)
    if not resolved:
        raise ValueError("positions is empty: pass None for all positions, or a list of indices")
    return sorted(resolved)


def resolve_rows(layers: Optional[Sequence[Union[int, str]]], labels: list[str]) -> list[int]:
    """Stack indices to decode, in stream order; ``None`` means all. The final row is always kept: it is
    the reference every divergence and the final top-1 refer to."""
    n = len(labels)
    if layers is None:
        return list(range(n))
    if isinstance(layers, (int, str)):
        layers = [layers]
    chosen = set()
    for layer in layers:
        if isinstance(layer, str):
            if layer not in labels:
                raise KeyError(f"no row labelled {layer!r}; the rows are {labels}")
            chosen.add(labels.index(layer))
        elif -n <= layer < n:
            chosen.add(layer % n)
        else:
            raise IndexError(f"layer {layer} is out of range: the stack has rows 0..{n - 1} "
                             f"({labels[0]} .. {labels[-1]}), negative indices count from the end")
    return sorted(chosen | {n - 1})


def prepare(
    token_ids: Int[Tensor, "batch seq"],
    tokenizer,
    d_vocab: int,
    positions: Optional[Sequence[int]],
    targets: Sequence[tokens.TargetSpec],
) -> LensRequest:
    """Validate positions and targets against the prompt and vocabulary, before any decoding."""
    if isinstance(targets, (str, int)):
        targets = [targets]
    batch, seq = token_ids.shape
    chosen = resolve_positions(positions, seq)
    ids = tokens.target_ids(tokenizer, targets, d_vocab)
    names = [t if isinstance(t, str) else tokenizer.decode([t]) for t in targets]
    nxt = tokens.next_token_ids(token_ids, readout.NO_TARGET)[:, chosen]  # [batch, pos]
    user = torch.tensor(ids, dtype=torch.long).expand(batch, len(chosen), len(ids))
    per_token = torch.cat([nxt.unsqueeze(-1), user], dim=-1).reshape(batch * len(chosen), 1 + len(ids))
    return LensRequest(chosen, names, ids, per_token)


def assemble(
    stats: dict[str, Tensor],
    request: LensRequest,
    labels: list[str],
    token_ids: Int[Tensor, "batch seq"],
    tokenizer,
) -> LensResult:
    """Label the flat ``[row, token, ...]`` statistics as ``[row, batch, pos, ...]``."""
    batch = token_ids.shape[0]
    n_pos = len(request.positions)

    def unflatten(x: Tensor) -> Tensor:
        if x.dim() == 1:
            return x.reshape(batch, n_pos)
        return x.reshape(x.shape[0], batch, n_pos, *x.shape[2:])

    s = {name: unflatten(value) for name, value in stats.items()}
    shown = torch.cat([s["top_ids"].reshape(-1), s["final_top1"].reshape(-1), token_ids.reshape(-1),
                       torch.tensor(request.target_ids, dtype=torch.long)])
    return LensResult(
        labels=list(labels),
        positions=request.positions,
        token_ids=token_ids,
        vocab_strings=tokens.token_strings(tokenizer, shown),
        top_ids=s["top_ids"],
        top_logprobs=s["top_logprobs"],
        entropy=s["entropy"],
        kl_final_row=s["kl_final_row"],
        kl_row_final=s["kl_row_final"],
        final_top1=s["final_top1"],
        final_top1_logprob=s["final_top1_logprob"],
        final_top1_rank=s["final_top1_rank"],
        next_token_logprob=s["target_logprobs"][..., 0],
        next_token_rank=s["target_ranks"][..., 0],
        target_names=request.target_names,
        target_ids=torch.tensor(request.target_ids, dtype=torch.long),
        target_logprobs=s["target_logprobs"][..., 1:],
        target_ranks=s["target_ranks"][..., 1:],
    )


@typechecked
def logit_lens_from_stack(
    stack: Float[Tensor, "row batch seq d_model"],
    labels: list[str],
    decoder: Decoder,
    token_ids: Int[Tensor, "batch seq"],
    tokenizer,
    *,
    layers: Optional[Sequence[Union[int, str]]] = None,
    positions: Optional[Sequence[int]] = None,
    top_k: int = 5,
    targets: Sequence[tokens.TargetSpec] = (),
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
) -> LensResult:
    """The logit lens of a residual stack whose last row is the model's final residual stream.

    ``layers`` picks rows by index or label (the final row is always included); ``positions`` picks
    prompt positions; ``targets`` are single-token strings or ids scored at every row and position.
    """
    if len(labels) != stack.shape[0]:
        raise ValueError(f"{len(labels)} labels for a stack of {stack.shape[0]} rows")
    rows = resolve_rows(layers, labels)
    request = prepare(token_ids, tokenizer, decoder.d_vocab, positions, targets)
    batch, d_model = stack.shape[1], stack.shape[3]
    flat = stack[rows][:, :, request.positions].reshape(len(rows), batch * len(request.positions), d_model)
    if torch.isnan(flat).any():
        raise ValueError("the residual stream contains NaN at the decoded rows/positions; the lens would only propagate it")
    stats = decoder.statistics(flat, request.per_token_targets, top_k, vocab_chunk, token_chunk)
    return assemble(stats, request, [labels[i] for i in rows], token_ids, tokenizer)
