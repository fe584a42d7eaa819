"""The lens request: what to compute, where, and for which tokens, validated once for both backends.

``build`` turns a lens call's arguments into a request (a plain dict, so it pickles anywhere): the
reductions (``lens_plugins.core.reductions``), the prompt positions (one position rule:
``resolve_positions``), the targets and token sets as token ids (one token rule: ``single_token_id``).
TransformerLens builds it on the caller's machine; the in-trace nnsight lens builds it where the model
runs (on an NDIF server, with the model's own tokenizer). Either way the same function refuses the same
bad input with the same message.
"""

import torch

from lens_plugins.core.errors import LensError, LensIndexError, LensTypeError, LensValueError
from lens_plugins.core.readout import NO_TARGET
from lens_plugins.core.reductions import COLUMNS, LENS
from lens_plugins.core.track import check_auto_tokens


def check_top_k(top_k):
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise LensValueError(f"top_k must be a positive integer (the number of best tokens kept per row), got {top_k!r}")
    return top_k


def check_reductions(reductions):
    if isinstance(reductions, str):
        reductions = [reductions]
    unknown = [name for name in reductions if not isinstance(name, str) or name not in LENS]
    if unknown:
        raise LensValueError(f"unknown reductions {unknown}; choose from {list(LENS)}")
    return tuple(dict.fromkeys(reductions))


def readout_reductions(reductions, n_user_columns):
    """The readout's reductions for a lens request: its own names, plus ``targets`` when any token is scored."""
    columns = [c for c in COLUMNS if c in reductions]
    wanted = [r for r in reductions if r not in COLUMNS]
    if columns or n_user_columns:
        wanted.append("targets")
    return tuple(wanted)


def resolve_positions(positions, seq_len):
    """Absolute, sorted, de-duplicated prompt positions (``None``: all); negative counts from the end; an
    index outside the prompt is refused, never wrapped."""
    if seq_len == 0:
        raise LensValueError("the prompt is empty: there is no position to decode")
    if positions is None:
        return list(range(seq_len))
    if isinstance(positions, int) and not isinstance(positions, bool):
        positions = [positions]
    if isinstance(positions, (str, bytes)) or not hasattr(positions, "__iter__"):
        raise LensTypeError(f"positions must be None, an int or a list of ints, got {positions!r}")
    chosen = set()
    for pos in positions:
        if isinstance(pos, bool) or not isinstance(pos, int):
            raise LensTypeError(f"positions must be None, an int or a list of ints, got {positions!r}")
        if not -seq_len <= pos < seq_len:
            raise LensIndexError(f"position {pos} is out of range for a prompt of {seq_len} tokens "
                             f"(valid: {-seq_len} .. {seq_len - 1}): check positions=")
        chosen.add(pos % seq_len)
    if not chosen:
        raise LensValueError("positions is empty: pass None for all positions, or a list of indices")
    return sorted(chosen)


def single_token_id(tokenizer, target, d_vocab):
    """The single token id a target names. A string that is not exactly one token is refused with its
    tokenisation: silently scoring its first piece would answer a different question."""
    if isinstance(target, int) and not isinstance(target, bool):
        if not 0 <= target < d_vocab:
            raise LensValueError(f"target id {target} is outside the vocabulary [0, {d_vocab})")
        return target
    if not isinstance(target, str) or target == "":
        raise LensValueError(f"a target must be a non-empty string or a token id, got {target!r}")
    ids = tokenizer.encode(target, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise LensValueError(
            f"target {target!r} is {len(ids)} tokens, not one: it tokenises as {pieces} (ids {ids}). "
            "Pass a single-token string (mind the leading space, e.g. ' Paris'), or a token id."
        )
    if not ids[0] < d_vocab:
        raise LensValueError(
            f"target {target!r} is token id {ids[0]}, outside this model's vocabulary of {d_vocab}: "
            "the tokenizer does not belong to the model"
        )
    return ids[0]


def token_set_ids(tokenizer, spec, d_vocab, argument="target"):
    """The ids of an attribution target (or distractor: ``argument`` names which, in every refusal): one token
    (string or id) or a list of them (a token set), each checked by ``single_token_id``; a token named twice is
    refused (it would count twice)."""
    return _naming(argument, lambda: _token_set_ids(tokenizer, spec, d_vocab))


def _token_set_ids(tokenizer, spec, d_vocab):
    if isinstance(spec, (str, int)):
        members = [spec]
    elif isinstance(spec, (list, tuple)):
        members = list(spec)
    else:
        raise LensTypeError(f"a target must be a token (a string or an id) or a list of them (a token set), "
                            f"got {type(spec).__name__} {spec!r}")
    if not members:
        raise LensValueError("an empty token set: give at least one token, e.g. ' Paris' or [' Paris', 'Paris']")
    ids = [single_token_id(tokenizer, m, d_vocab) for m in members]
    if len(set(ids)) != len(ids):
        raise LensValueError(f"the token set {members} names a token twice (ids {ids}): list each member once")
    return ids


def _naming(argument, make):
    """``make()``, a refusal prefixed with the argument it concerns (a token rule is shared by several)."""
    try:
        return make()
    except LensError as error:
        raise type(error)(f"{argument}: {error}") from None


def check_token_sets(token_sets):
    """``token_sets`` as a dict ``{name: [tokens]}`` (a bare token is a one-member set), or refused, named."""
    if token_sets is None:
        return {}
    if not hasattr(token_sets, "items"):
        raise LensTypeError(f"token_sets must be a dict {{name: [tokens]}}, got {type(token_sets).__name__} "
                            f"{token_sets!r}")
    sets = {}
    for name, members in dict(token_sets).items():
        if not isinstance(name, str):
            raise LensTypeError(f"token_sets: a set's name must be a string, got {name!r}")
        sets[name] = [members] if isinstance(members, (str, int)) else members
    return sets


def build(tokenizer, d_vocab, seq_len, top_k, positions, targets, token_sets, reductions, auto_tokens=0):
    """The request of one lens call, or the first error its arguments hold. ``auto_tokens``: how many tokens
    per position ``core.track`` chooses and traces (0: none)."""
    if isinstance(targets, (str, int)):
        targets = [targets]
    reductions = check_reductions(reductions)
    target_ids = [_naming("targets", lambda t=t: single_token_id(tokenizer, t, d_vocab)) for t in targets]
    sets = check_token_sets(token_sets)
    set_ids = []
    for name, members in sets.items():
        ids = _naming(f"token_sets[{name!r}]", lambda members=members: list(dict.fromkeys(
            single_token_id(tokenizer, m, d_vocab) for m in members)))
        if not ids:
            raise LensValueError(f"the token set {name!r} of token_sets has no members: give it at least one token")
        set_ids.append(ids)
    return {
        "top_k": check_top_k(top_k),
        "positions": resolve_positions(positions, seq_len),
        "reductions": reductions,
        "target_names": [t if isinstance(t, str) else tokenizer.decode([t]) for t in targets],
        "target_ids": target_ids,
        "set_names": list(sets),
        "set_ids": set_ids,
        "auto_tokens": check_auto_tokens(auto_tokens),
    }


def user_ids(request):
    """The scored ids after the next/input-token columns: targets, then every set's members."""
    return list(request["target_ids"]) + [i for members in request["set_ids"] for i in members]


def target_columns(token_ids, attention_mask, positions, reductions, user_ids):
    """``[batch * positions, C]`` token ids to score: the next token and the input token (when those
    reductions are asked for), then ``user_ids``. Padding, and the next token after the last real
    one, get ``NO_TARGET``, so they never enter a rank or an average."""
    real = attention_mask.bool()
    columns = []
    if "next_token" in reductions:
        nxt = torch.full_like(token_ids, NO_TARGET)
        nxt[:, :-1] = torch.where(real[:, :-1] & real[:, 1:], token_ids[:, 1:], torch.full_like(token_ids[:, 1:], NO_TARGET))
        columns.append(nxt[:, positions])
    if "input_token" in reductions:
        columns.append(torch.where(real, token_ids, torch.full_like(token_ids, NO_TARGET))[:, positions])
    batch = token_ids.shape[0]
    user = torch.tensor(list(user_ids), dtype=torch.long, device=token_ids.device)
    stacked = [c.long().unsqueeze(-1) for c in columns] + [user.reshape(1, 1, -1).expand(batch, len(positions), -1)]
    return torch.cat(stacked, dim=-1).reshape(batch * len(positions), -1)

__all__ = ["check_top_k", "check_reductions", "check_token_sets", "readout_reductions", "resolve_positions", "single_token_id",
    "token_set_ids", "build", "user_ids", "target_columns"]
