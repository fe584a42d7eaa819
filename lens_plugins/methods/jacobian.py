"""What a Jacobian-lens intervention did, measured: the model's next-token distribution at the last position
of each prompt with and without the ``Edit``, both backends (``run_jacobian_edit`` on either) returning this one type.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins.lenses.jacobian import Edit

TOP_K = 5


@dataclass
class EditResult:
    """``clean_probs`` / ``edited_probs`` are the edited tokens' next-token probabilities (float32) without and
    with the edit; ``kl`` is KL(clean || edited) in nats; ``clean_top`` / ``edited_top`` the top-5 ids."""

    description: str
    tokens: list[int]
    token_strings: list[str]
    clean_probs: Float[Tensor, "batch n_tokens"]
    edited_probs: Float[Tensor, "batch n_tokens"]
    kl: Float[Tensor, " batch"]
    clean_top: Int[Tensor, "batch k"]
    edited_top: Int[Tensor, "batch k"]
    clean_top_strings: list[list[str]]
    edited_top_strings: list[list[str]]

    def to_dataframe(self):
        """One line per (prompt, edited token): its probability before and after, and the prompt's KL."""
        import pandas as pd

        return pd.DataFrame.from_records([
            {"prompt": b, "token": self.token_strings[j], "clean_prob": float(self.clean_probs[b, j]),
             "edited_prob": float(self.edited_probs[b, j]), "kl": float(self.kl[b])}
            for b in range(self.clean_probs.shape[0]) for j in range(len(self.tokens))])


def edit_result(edit: Edit, clean_logits: Tensor, edited_logits: Tensor, tokenizer) -> EditResult:
    """The ``EditResult`` of last-position logits ``[batch, vocab]`` without and with ``edit``."""
    clean = torch.log_softmax(clean_logits.detach().float(), dim=-1)
    edited = torch.log_softmax(edited_logits.detach().float(), dim=-1)
    kl = (clean.exp() * (clean - edited)).sum(-1)
    ids = torch.tensor(edit.tokens)
    clean_top = clean.topk(TOP_K, dim=-1).indices.cpu()
    edited_top = edited.topk(TOP_K, dim=-1).indices.cpu()

    def strings(rows):
        return [tokenizer.convert_ids_to_tokens(row.tolist()) for row in rows]

    return EditResult(
        description=edit.describe(), tokens=list(edit.tokens),
        token_strings=tokenizer.convert_ids_to_tokens(list(edit.tokens)),
        clean_probs=clean.exp()[:, ids].cpu(), edited_probs=edited.exp()[:, ids].cpu(), kl=kl.cpu(),
        clean_top=clean_top, edited_top=edited_top, clean_top_strings=strings(clean_top),
        edited_top_strings=strings(edited_top))

__all__ = ["TOP_K", "EditResult", "edit_result"]
