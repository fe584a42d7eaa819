"""Token bookkeeping on the caller's side: readable strings for ids, tokenisation variants of a word, and
the one way every figure, table and page shows a token (whitespace visible, control characters escaped)."""

import html
import unicodedata
from collections.abc import Sequence
from typing import Union

import torch

from lens_plugins.core.errors import LensValueError
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
        raise LensValueError("variants of an empty word: give a word such as 'Paris'")
    candidates = []
    for cased in dict.fromkeys([bare, bare.lower(), bare.capitalize(), bare.upper()]):
        candidates += [cased, " " + cased]
    kept, dropped = [], []
    for text in dict.fromkeys(candidates):
        ids = tokenizer.encode(text, add_special_tokens=False)
        (kept if len(ids) == 1 else dropped).append(text)
    if not kept:
        raise LensValueError(f"no spelling of {word!r} is a single token (tried {candidates}); score a token id instead")
    if verbose:
        print(f"token set {bare!r}: kept {kept}" + (f", dropped multi-token {dropped}" if dropped else ""))
    return kept


def set_ids(tokenizer, members: Sequence[TargetSpec], d_vocab: int) -> list[int]:
    ids = list(dict.fromkeys(single_token_id(tokenizer, m, d_vocab) for m in members))
    if not ids:
        raise LensValueError("a token set needs at least one member")
    return ids


# One glyph convention for every figure, table and page: whitespace shown, control characters escaped.
_VISIBLE = {" ": "·", "\n": "¶", "\t": "→", "\r": "←"}
_ISOLATE = ("\u2068", "\u2069")  # first-strong isolate: right-to-left text does not reorder its neighbours


def visible_text(token: str) -> str:
    """A token with whitespace and control characters made visible (not yet escaped)."""
    out = []
    for char in token:
        if char in _VISIBLE:
            out.append(_VISIBLE[char])
        elif unicodedata.category(char) in ("Cc", "Cf") and char not in _ISOLATE:
            out.append(f"\\x{ord(char):02x}" if ord(char) < 256 else f"\\u{ord(char):04x}")
        else:
            out.append(char)
    text = "".join(out)
    if any(unicodedata.bidirectional(c) in ("R", "AL") for c in text):
        text = _ISOLATE[0] + text + _ISOLATE[1]
    return text


def display_token(token: str) -> str:
    """A token as plotly text: whitespace made visible (a leading space is what separates ' Paris' from
    'Paris') and HTML-escaped, since plotly renders text as pseudo-HTML and '<|im_start|>' would vanish."""
    return html.escape(visible_text(token), quote=False)

__all__ = ["TargetSpec", "token_strings", "variants", "set_ids", "visible_text", "display_token"]
