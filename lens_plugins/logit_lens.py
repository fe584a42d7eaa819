"""From a residual stack to a ``LensResult``: the backend-free middle of every adapter.

An adapter's job ends at ``(stack, labels, decoder, token_ids, tokenizer)``; what happens next is the same
for TransformerLens and nnsight: choose rows and positions, build the per-token targets (next token, input
token, the user's targets and token-set members), stream the decoder over the stack, and label the
result. ``prepare`` and ``assemble`` are split so that a remote trace can run the streamed part on the server.
"""

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins import prompt, tokens
from lens_plugins.decoder import Decoder
from lens_plugins.result import LensResult
from lens_plugins.typecheck import typechecked

DEFAULT_VOCAB_CHUNK = None  # tile sizes for the device W_U lives on: readout.tile_sizes
DEFAULT_TOKEN_CHUNK = None
TokenSets = Mapping[str, Sequence[tokens.TargetSpec]]


@dataclass(frozen=True)
class LensRequest:
    """Everything about a lens call that is known before any activation is read."""

    positions: list[int]
    reductions: tuple[str, ...]
    target_names: list[str]
    target_ids: list[int]
    set_names: list[str]
    set_ids: list[list[int]]

    @property
    def user_ids(self) -> list[int]:
        """The scored ids after the next/input-token columns: targets, then every set's members."""
        return self.target_ids + [i for members in self.set_ids for i in members]


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
    seq_len: int,
    tokenizer,
    d_vocab: int,
    positions: Optional[Union[int, Sequence[int]]],
    targets: Sequence[tokens.TargetSpec],
    reductions: Sequence[str] = prompt.DEFAULT_LENS_REDUCTIONS,
    token_sets: Optional[TokenSets] = None,
) -> LensRequest:
    """Validate positions, reductions, targets and token sets against the prompt and vocabulary, before
    any decoding."""
    if isinstance(targets, (str, int)):
        targets = [targets]
    reductions = prompt.check_reductions(reductions)
    ids = [prompt.single_token_id(tokenizer, t, d_vocab) for t in targets]
    names = [t if isinstance(t, str) else tokenizer.decode([t]) for t in targets]
    sets = dict(token_sets or {})
    return LensRequest(
        positions=prompt.resolve_positions(positions, seq_len),
        reductions=reductions,
        target_names=names,
        target_ids=ids,
        set_names=list(sets),
        set_ids=[tokens.set_ids(tokenizer, members, d_vocab) for members in sets.values()],
    )


def per_token_targets(request: LensRequest, token_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    mask = torch.ones_like(token_ids) if attention_mask is None else attention_mask
    return prompt.target_columns(token_ids, mask, request.positions, request.reductions, request.user_ids)


def assemble(
    stats: dict[str, Tensor],
    request: LensRequest,
    labels: list[str],
    token_ids: Int[Tensor, "batch seq"],
    tokenizer,
    attention_mask: Optional[Int[Tensor, "batch seq"]] = None,
) -> LensResult:
    """Label the flat ``[row, token, ...]`` statistics as ``[row, batch, pos, ...]``."""
    batch = token_ids.shape[0]
    n_pos = len(request.positions)

    def unflatten(x: Tensor) -> Tensor:
        x = x.cpu()
        if x.dim() == 1:
            return x.reshape(batch, n_pos)
        return x.reshape(x.shape[0], batch, n_pos, *x.shape[2:])

    s = {name: unflatten(value) for name, value in stats.items()}
    fields = {name: s.get(name) for name in (
        "top_ids", "top_logprobs", "entropy", "kl_final_row", "kl_row_final", "js_final", "tv_final",
        "kl_input_row", "kl_next_row", "final_top1", "final_top1_logprob", "final_top1_rank")}
    rows = len(labels)
    empty_f = torch.zeros(rows, batch, n_pos, 0)
    logprobs = s.get("target_logprobs", empty_f)
    ranks = s.get("target_ranks", empty_f.long())
    column = 0
    for name in prompt.COLUMN_REDUCTIONS:
        if name in request.reductions:
            fields[f"{name}_logprob"] = logprobs[..., column]
            fields[f"{name}_rank"] = ranks[..., column]
            column += 1
    n_targets = len(request.target_ids)
    fields["target_logprobs"] = logprobs[..., column:column + n_targets]
    fields["target_ranks"] = ranks[..., column:column + n_targets]
    column += n_targets
    set_logprobs, set_ranks = [], []
    for members in request.set_ids:
        member_logprobs = logprobs[..., column:column + len(members)]
        member_ranks = ranks[..., column:column + len(members)]
        set_logprobs.append(member_logprobs.logsumexp(-1))  # probabilities add, so log-probs log-sum-exp
        set_ranks.append(member_ranks.amin(-1))  # a set ranks as its best member
        column += len(members)
    fields["set_logprobs"] = torch.stack(set_logprobs, -1) if set_logprobs else empty_f
    fields["set_ranks"] = torch.stack(set_ranks, -1) if set_ranks else empty_f.long()

    shown = [token_ids.reshape(-1), torch.tensor(request.user_ids, dtype=torch.long)]
    shown += [s[name].reshape(-1) for name in ("top_ids", "final_top1") if name in s]
    return LensResult(
        labels=list(labels),
        positions=request.positions,
        token_ids=token_ids.cpu(),
        attention_mask=(torch.ones_like(token_ids) if attention_mask is None else attention_mask).cpu().long(),
        vocab_strings=tokens.token_strings(tokenizer, torch.cat(shown)),
        reductions=list(request.reductions),
        log_partition=s["log_partition"],
        target_names=request.target_names,
        target_ids=torch.tensor(request.target_ids, dtype=torch.long),
        set_names=request.set_names,
        set_members=[[tokenizer.decode([i]) for i in members] for members in request.set_ids],
        **fields,
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
    positions: Optional[Union[int, Sequence[int]]] = None,
    top_k: int = 5,
    targets: Sequence[tokens.TargetSpec] = (),
    token_sets: Optional[TokenSets] = None,
    reductions: Sequence[str] = prompt.DEFAULT_LENS_REDUCTIONS,
    attention_mask: Optional[Int[Tensor, "batch seq"]] = None,
    vocab_chunk: Optional[int] = DEFAULT_VOCAB_CHUNK,
    token_chunk: Optional[int] = DEFAULT_TOKEN_CHUNK,
    precision: str = "float32",
) -> LensResult:
    """The logit lens of a residual stack whose first row is the embeddings and last row the model's
    final residual stream.

    ``layers`` picks rows by index or label (the final row is always included); ``positions`` picks
    prompt positions; ``targets`` are single-token strings or ids scored at every row and position;
    ``token_sets`` maps a name to several tokens whose probabilities are summed (see
    ``tokens.variants``); ``reductions`` names what to compute (``prompt.LENS_REDUCTIONS``).
    """
    if len(labels) != stack.shape[0]:
        raise ValueError(f"{len(labels)} labels for a stack of {stack.shape[0]} rows")
    rows = resolve_rows(layers, labels)
    request = prepare(token_ids.shape[1], tokenizer, decoder.d_vocab, positions, targets, reductions, token_sets)
    if "kl_input_row" in request.reductions and rows[0] != 0:
        raise ValueError("kl_input_row compares every row with the input row ('embed'): keep row 0 in layers")
    batch, d_model = stack.shape[1], stack.shape[3]
    # Index only what is not taken whole: a full stack is a view, not a rows x tokens x d_model copy.
    selected = stack if len(rows) == stack.shape[0] else stack[rows]
    if len(request.positions) != stack.shape[2]:
        selected = selected[:, :, request.positions]
    check_finite(selected, [labels[i] for i in rows], request.positions)
    flat = selected.reshape(len(rows), batch * len(request.positions), d_model)
    columns = per_token_targets(request, token_ids, attention_mask)
    stats = decoder.statistics(
        flat, columns, top_k, vocab_chunk, token_chunk,
        prompt.readout_reductions(request.reductions, len(request.user_ids)), precision,
    )
    return assemble(stats, request, [labels[i] for i in rows], token_ids, tokenizer, attention_mask)


def check_finite(stack: Tensor, labels: Sequence[str], positions: Sequence[int]) -> None:
    """Refuse a residual stack ``[row, batch, pos, d_model]`` holding NaN or inf, naming the first bad entry:
    the final norm would turn it into NaN log-probs everywhere downstream."""
    bad = ~torch.isfinite(stack).all(-1)
    if bad.any():
        row, item, pos = (int(i) for i in bad.nonzero()[0])
        kind = "NaN" if torch.isnan(stack[row, item, pos]).any() else "inf"
        raise ValueError(
            f"the residual stream contains {kind} at row {labels[row]!r}, batch item {item}, prompt position "
            f"{positions[pos]} ({int(bad.sum())} non-finite vectors in all); the lens would only propagate it. "
            "Check the activations (an overflow in half precision?) before decoding them."
        )


def check_context(n_tokens: int, limit: Optional[int]) -> None:
    """Refuse a prompt longer than the model's context window (``limit``; ``None``: no known limit), before
    the model silently truncates it or runs positions it was never trained on."""
    if limit is not None and n_tokens > limit:
        raise ValueError(
            f"the prompt is {n_tokens} tokens, longer than the model's context of {limit} tokens: "
            f"shorten it (or split it) to at most {limit} tokens"
        )


def pad_batch(sequences: Sequence[Tensor], pad_id: int, side: str) -> tuple[Tensor, Tensor]:
    """``(token_ids, attention_mask)``, both ``[batch, longest]``, of ragged 1-d token sequences padded on
    ``side`` ("left" or "right") with ``pad_id``; the mask is 1 on real tokens."""
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    longest = max(len(s) for s in sequences)
    token_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), longest, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(longest - len(sequence), longest) if side == "left" else slice(0, len(sequence))
        token_ids[row, span] = sequence
        mask[row, span] = 1
    return token_ids, mask


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Run ``module`` in eval mode for the duration (a model in training mode runs dropout, so its lens
    would not be its prediction), warning that it did so, and put training mode back afterwards."""
    if not module.training:
        yield
        return
    warnings.warn(
        "the model is in training mode (dropout on): the lens ran it in eval mode for this call and then "
        "put it back in training mode. Call model.eval() first to silence this warning.",
        RuntimeWarning, stacklevel=3,
    )
    module.eval()
    try:
        yield
    finally:
        module.train()


def check_prompts(prompt: Union[str, Sequence[str]]) -> list[str]:
    """The prompts of a one-call lens as a list, refusing an empty batch and empty or whitespace-only text
    (which tokenises to nothing, or to a lone BOS: no prediction to look at)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("the prompt is empty (an empty list): give the model some text to predict from")
    for index, text in enumerate(prompts):
        if not isinstance(text, str):
            raise TypeError(f"prompt {index} is a {type(text).__name__}, not a string")
        if not text.strip():
            where = "the prompt" if isinstance(prompt, str) else f"prompt {index} of the batch"
            raise ValueError(f"{where} is empty ({text!r}): give the model some text to predict from")
    return prompts
