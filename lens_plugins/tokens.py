"""Token bookkeeping shared by the adapters: targets as ids, ids as readable strings."""

from collections.abc import Sequence
from typing import Union

import torch
from jaxtyping import Int
from torch import Tensor

TargetSpec = Union[str, int]


def target_id(tokenizer, target: TargetSpec, d_vocab: int) -> int:
    """The single token id a target names; a string that is not exactly one token is refused, with
    its tokenisation, because silently scoring its first piece answers a different question."""
    if isinstance(target, int):
        if not 0 <= target < d_vocab:
            raise ValueError(f"target id {target} is outside the vocabulary [0, {d_vocab})")
        return target
    if not isinstance(target, str) or target == "":
        raise ValueError(f"a target must be a non-empty string or a token id, got {target!r}")
    ids = tokenizer.encode(target, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(
            f"target {target!r} is {len(ids)} tokens, not one: it tokenises as {pieces} (ids {ids}). "
            "Pass a single-token string (mind the leading space, e.g. ' Paris'), or a token id."
        )
    return ids[0]


def target_ids(tokenizer, targets: Sequence[TargetSpec], d_vocab: int) -> list[int]:
    return [target_id(tokenizer, t, d_vocab) for t in targets]


def next_token_ids(token_ids: Int[Tensor, "batch pos"], no_target: int) -> Int[Tensor, "batch pos"]:
    """The actual next token at every position; ``no_target`` at the last one."""
    nxt = torch.full_like(token_ids, no_target)
    nxt[:, :-1] = token_ids[:, 1:]
    return nxt


def token_strings(tokenizer, ids) -> dict[int, str]:
    """Readable strings for a set of ids, decoded one by one (so ' Paris' keeps its space)."""
    unique = sorted({int(i) for i in torch.as_tensor(ids).reshape(-1).tolist() if int(i) >= 0})
    return {i: tokenizer.decode([i]) for i in unique}
