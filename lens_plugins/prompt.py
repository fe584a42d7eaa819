"""Prompt bookkeeping shared by the local adapters and the in-trace (remote) lens: which positions to
decode, which token ids to score at each of them, and which readout reductions that takes.

Like ``readout``, this module imports only torch and is shipped by source to NDIF servers, where the
trace body encodes targets with the model's own tokenizer.
"""

import torch

from lens_plugins.readout import NO_TARGET, REDUCTIONS

# Reductions that score a token per position, on top of the readout's own: the actual next token
# (log-prob = -cross-entropy, rank) and the input token itself (nostalgebraist's "input discarding").
COLUMN_REDUCTIONS = ("next_token", "input_token")
LENS_REDUCTIONS = tuple(r for r in REDUCTIONS if r != "targets") + COLUMN_REDUCTIONS
DEFAULT_LENS_REDUCTIONS = ("top_k", "entropy", "kl_final_row", "kl_row_final", "final_top1", "next_token")


def check_reductions(reductions):
    unknown = [name for name in reductions if name not in LENS_REDUCTIONS]
    if unknown:
        raise ValueError(f"unknown reductions {unknown}; choose from {list(LENS_REDUCTIONS)}")
    return tuple(dict.fromkeys(reductions))


def readout_reductions(reductions, n_user_columns):
    """The readout's reductions for a lens request: its own names, plus ``targets`` when any token is scored."""
    columns = [c for c in COLUMN_REDUCTIONS if c in reductions]
    wanted = [r for r in reductions if r not in COLUMN_REDUCTIONS]
    if columns or n_user_columns:
        wanted.append("targets")
    return tuple(wanted)


def resolve_positions(positions, seq_len):
    """Absolute, sorted, de-duplicated prompt positions (``None``: all); negative counts from the end."""
    if seq_len == 0:
        raise ValueError("the prompt is empty: there is no position to decode")
    if positions is None:
        return list(range(seq_len))
    if isinstance(positions, int):
        positions = [positions]
    chosen = set()
    for pos in positions:
        if not -seq_len <= pos < seq_len:
            raise IndexError(f"position {pos} is out of range for a prompt of {seq_len} tokens "
                             f"(valid: {-seq_len} .. {seq_len - 1})")
        chosen.add(pos % seq_len)
    if not chosen:
        raise ValueError("positions is empty: pass None for all positions, or a list of indices")
    return sorted(chosen)


def single_token_id(tokenizer, target, d_vocab):
    """The single token id a target names. A string that is not exactly one token is refused with its
    tokenisation: silently scoring its first piece would answer a different question."""
    if isinstance(target, int) and not isinstance(target, bool):
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
    if not ids[0] < d_vocab:
        raise ValueError(
            f"target {target!r} is token id {ids[0]}, outside this model's vocabulary of {d_vocab}: "
            "the tokenizer does not belong to the model"
        )
    return ids[0]


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
