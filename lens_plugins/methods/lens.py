"""From a backend's rows to a ``LensResult``: the local, labelled ends of the one lens pipeline.

Both adapters build the same request (``core.request.build``) and run the same pipeline
(``core.pipeline.logit_lens``) with their own reader; what comes back, here or from a trace, is labelled by
``assemble``. ``logit_lens_from_stack`` runs the pipeline on a stack already in hand. The guards of the
one-call forms (context length, prompts, padding, eval mode) live here too, shared by both adapters.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins import tokens
from lens_plugins.core import defaults, pipeline
from lens_plugins.core import reductions as reduction_table
from lens_plugins.core import request as lens_request
from lens_plugins.core import rows as row_plan
from lens_plugins.core.errors import LensValueError
from lens_plugins.decoder import Decoder
from lens_plugins.methods.result import LensResult
from lens_plugins.typecheck import typechecked

DEFAULT_VOCAB_CHUNK = defaults.VOCAB_CHUNK
DEFAULT_TOKEN_CHUNK = defaults.TOKEN_CHUNK
DEFAULT_TOP_K = defaults.TOP_K
TokenSets = Mapping[str, Sequence[tokens.TargetSpec]]
# The result fields the readout fills directly (``targets`` is split into columns, targets and sets below).
_READOUT_FIELDS = tuple(field for name in reduction_table.READOUT if name != "targets"
                        for field in reduction_table.TABLE[name]["outputs"])
_AUTO_FIELDS = reduction_table.TABLE["auto_tokens"]["outputs"]  # [token, n] per position, [row, token, n] trajectories


@dataclass(frozen=True)
class LensRequest:
    """Everything about a lens call that is known before any activation is read (``core.request.build``)."""

    positions: list[int]
    reductions: tuple[str, ...]
    target_names: list[str]
    target_ids: list[int]
    set_names: list[str]
    set_ids: list[list[int]]
    top_k: int = DEFAULT_TOP_K
    auto_tokens: int = 0

    @classmethod
    def from_dict(cls, request: dict) -> "LensRequest":
        return cls(**{k: (tuple(v) if k == "reductions" else v) for k, v in request.items()})

    @property
    def user_ids(self) -> list[int]:
        """The scored ids after the next/input-token columns: targets, then every set's members."""
        return lens_request.user_ids(vars(self))


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

    s = {name: unflatten(value) for name, value in stats.items() if name not in _AUTO_FIELDS}
    fields = {name: s.get(name) for name in _READOUT_FIELDS}
    for name in _AUTO_FIELDS:
        if name in stats:
            value = stats[name].cpu()
            leading = value.shape[:-2]  # the rows of ``auto_logprobs``
            fields[name] = value.reshape(*leading, batch, n_pos, value.shape[-1])
    rows = len(labels)
    empty_f = torch.zeros(rows, batch, n_pos, 0)
    logprobs = s.get("target_logprobs", empty_f)
    ranks = s.get("target_ranks", empty_f.long())
    column = 0
    for name in reduction_table.COLUMNS:
        if name in request.reductions:
            logprob_field, rank_field = reduction_table.TABLE[name]["outputs"]
            fields[logprob_field] = logprobs[..., column]
            fields[rank_field] = ranks[..., column]
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
    if fields.get("auto_ids") is not None:
        shown.append(fields["auto_ids"][fields["auto_ids"] >= 0])
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


class Labelled(NamedTuple):
    """A row of a hand-made stack whose labels are not row labels ("layer 3"): selectable, not a ``Row``."""

    label: str


def rows_of(labels: Sequence[str]) -> list:
    """The rows a stack's labels name (``Row``s when every label parses, else ``Labelled``)."""
    try:
        return [row_plan.Row.parse(label) for label in labels]
    except ValueError:
        return [Labelled(label) for label in labels]


def run_lens(
    read,
    every: list,
    layers: Optional[Sequence[Union[int, str]]],
    token_ids: Int[Tensor, "batch seq"],
    tokenizer,
    decoder: Decoder,
    *,
    attention_mask: Optional[Int[Tensor, "batch seq"]] = None,
    positions=None,
    top_k: int = DEFAULT_TOP_K,
    targets: Sequence[tokens.TargetSpec] = (),
    token_sets: Optional[TokenSets] = None,
    reductions: Sequence[str] = reduction_table.DEFAULT_LENS,
    lens=None,
    vocab_chunk: Optional[int] = DEFAULT_VOCAB_CHUNK,
    token_chunk: Optional[int] = DEFAULT_TOKEN_CHUNK,
    precision: str = "float32",
    auto_tokens: int = 0,
) -> LensResult:
    """The local run of the pipeline: select rows, build the request, run, label. ``read(rows)`` is the
    backend's reader; ``every`` its full row plan."""
    chosen = row_plan.select(every, layers)
    request = lens_request.build(tokenizer, decoder.d_vocab, token_ids.shape[1], top_k, positions, targets,
                                 token_sets, reductions, auto_tokens)
    pipeline.check_rows(request, chosen, every)
    mask = torch.ones_like(token_ids) if attention_mask is None else attention_mask
    stats = pipeline.logit_lens(read, chosen, request, decoder, token_ids, mask, lens, vocab_chunk,
                                token_chunk, precision)
    return assemble(stats, LensRequest.from_dict(request), [row.label for row in chosen], token_ids,
                    tokenizer, attention_mask)


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
    top_k: int = DEFAULT_TOP_K,
    targets: Sequence[tokens.TargetSpec] = (),
    token_sets: Optional[TokenSets] = None,
    reductions: Sequence[str] = reduction_table.DEFAULT_LENS,
    attention_mask: Optional[Int[Tensor, "batch seq"]] = None,
    lens=None,
    vocab_chunk: Optional[int] = DEFAULT_VOCAB_CHUNK,
    token_chunk: Optional[int] = DEFAULT_TOKEN_CHUNK,
    precision: str = "float32",
    auto_tokens: int = 0,
) -> LensResult:
    """The logit lens of a residual stack whose first row is the embeddings and last row the model's
    final residual stream.

    ``layers`` picks rows by index or label (the final row is always included); ``positions`` picks
    prompt positions; ``targets`` are single-token strings or ids scored at every row and position;
    ``token_sets`` maps a name to several tokens whose probabilities are summed (see
    ``tokens.variants``); ``reductions`` names what to compute (``core.reductions.LENS``); ``lens`` maps
    each row before decoding (``lens_plugins.lenses``; row labels must then be row labels, "3_pre");
    ``auto_tokens=N`` also traces, per position, the N tokens most worth tracking (``core.track``: the final
    top-1, then tokens that peaked at an intermediate row and faded).
    """
    if len(labels) != stack.shape[0]:
        raise LensValueError(f"{len(labels)} labels for a stack of {stack.shape[0]} rows")
    every = rows_of(labels)
    if lens is not None and not isinstance(every[0], row_plan.Row):
        raise LensValueError(f"a lens maps rows by their labels ('embed', '3_pre', ...), but these labels are {labels}")
    index = {row: i for i, row in enumerate(every)}

    def read(rows, positions=None):
        picked = [index[row] for row in rows]
        chosen = stack if len(picked) == stack.shape[0] else stack[picked]
        return chosen if positions is None else chosen[:, :, positions]

    return run_lens(read, every, layers, token_ids, tokenizer, decoder, attention_mask=attention_mask,
                    positions=positions, top_k=top_k, targets=targets, token_sets=token_sets,
                    reductions=reductions, lens=lens, vocab_chunk=vocab_chunk, token_chunk=token_chunk,
                    precision=precision, auto_tokens=auto_tokens)

__all__ = ["DEFAULT_VOCAB_CHUNK", "DEFAULT_TOKEN_CHUNK", "DEFAULT_TOP_K", "TokenSets", "LensRequest", "assemble",
    "Labelled", "rows_of", "run_lens", "logit_lens_from_stack"]
