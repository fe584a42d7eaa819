"""Token bookkeeping on the caller's side: readable strings for ids, and tokenisation variants of a word."""

from collections.abc import Sequence
from typing import Union

import torch

from lens_plugins.core.request import single_token_id

TargetSpec = Union[str, int]


def token_strings(tokenizer, ids) -> dict[int, str]:
    """Readable strings for a set of ids, decoded one by one (so ' Paris' keeps its space)."""
    unique = sorted({int(i) for i in torch.as_tensor(ids).reshape(-1).tolist() if int(i) >= 0})
    return {i: tokenizer.decode([i]) for i in unique}


def variants(tokenizer, word: str, verbose: bool = True) -> list[str]:
    """The single-token spellings of ``word``: with and without a leading space, and in lower, title and
    upper case, as a token set for ``token_sets={word: variants(tok, word)}``. Multi-token spellings are
    left out; with ``verbose`` it prints what it kept and what it dropped, because a set that silently
    lost " PARIS" answers a different question."""
    bare = word.strip()
    if not bare:
        raise ValueError("variants of an empty word: give a word such as 'Paris'")
    candidates = []
    for cased in dict.fromkeys([bare, bare.lower(), bare.capitalize(), bare.upper()]):
        candidates += [cased, " " + cased]
    kept, dropped = [], []
    for text in dict.fromkeys(candidates):
        ids = tokenizer.encode(text, add_special_tokens=False)
        (kept if len(ids) == 1 else dropped).append(text)
    if not kept:
        raise ValueError(f"no spelling of {word!r} is a single token (tried {candidates}); score a token id instead")
    if verbose:
        print(f"token set {bare!r}: kept {kept}" + (f", dropped multi-token {dropped}" if dropped else ""))
    return kept


def set_ids(tokenizer, members: Sequence[TargetSpec], d_vocab: int) -> list[int]:
    ids = list(dict.fromkeys(single_token_id(tokenizer, m, d_vocab) for m in members))
    if not ids:
        raise ValueError("a token set needs at least one member")
    return ids
