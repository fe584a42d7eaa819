"""Future Lens (Pal et al., CoNLL 2023): read tokens past the next one from a single hidden state.

A ``FutureLens`` holds, per lens row ``l`` ("embed", "3_pre", "29_post") and for one ``N``, a learned affine map
from the hidden state at position ``t`` to the final layer's hidden state at ``t + N - 1``; the model's own final
norm and unembedding decode it into a prediction of token ``t + N``. Maps are applied residually and start at
zero (``h + h A^T + b``, the tuned-lens convention), so an untrained Future Lens is the logit lens and weight
decay pulls toward it; for ``N = 1`` at the last row the identity is exact.

It is a lens in the package's sense (``lens_plugins.lenses.Lens``: ``transform(resid, rows)`` and
``affine(rows, d_model)``, the lens seam), so ``lens=`` of every lens entry point takes it, remote nnsight
traces included (as tensors). There each mapped row at ``t`` (the final row too, if the lens maps it) decodes
a prediction of token ``t + N``, while ``next_token`` and the divergences still refer to position ``t``;
``lens_result`` instead pairs each row with the model's own state at ``t + N - 1``. It is
trained with ``lens_plugins.training.loop.fit`` against KL(model's distribution at ``t + N - 1`` || decoded map), the
memory-bounded ``core.vocab_loss.kl_divergence``, and evaluated with the streamed readout: top-1 agreement with
the model's own prediction at ``t + N - 1``, next to a bigram baseline (the token seen most often ``N``
positions after token ``t`` in the training text).
"""

import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins.backends import hf as hf_reader
from lens_plugins.backends._common import unwrap
from lens_plugins.core import architectures, future, vocab_loss
from lens_plugins.core import verification
from lens_plugins.core.defaults import TOP_K
from lens_plugins.core.errors import LensIndexError, LensKeyError, LensValueError
from lens_plugins.core.lenses import apply_affine, check_fits, check_output
from lens_plugins.core.request import single_token_id
from lens_plugins.core.rows import Row
from lens_plugins.decoder import Decoder
from lens_plugins.lenses.affine import check_affine_shapes
from lens_plugins.lenses.tuned import check_finite_tensor
from lens_plugins.methods.lens import DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK, LensRequest, assemble
from lens_plugins.methods.result import LensResult
from lens_plugins.training import loop as train
from lens_plugins.typecheck import typechecked

FORMAT = "lens_plugins.future_lens/1"
RowLike = Union[Row, str]


class FutureLens(torch.nn.Module):
    """Per-row residual affine maps predicting the final hidden state ``n_ahead - 1`` positions later."""

    def __init__(self, d_model: int, labels: Sequence[str], n_ahead: int):
        super().__init__()
        if n_ahead < 1:
            raise LensValueError(f"n_ahead must be at least 1 (1: the next token), got {n_ahead}")
        self.labels = [Row.parse(label).label for label in labels]
        self.n_ahead = n_ahead
        self.weight = torch.nn.Parameter(torch.zeros(len(self.labels), d_model, d_model))
        self.bias = torch.nn.Parameter(torch.zeros(len(self.labels), d_model))

    @property
    def d_model(self) -> int:
        return self.weight.shape[-1]

    @property
    def made_for(self) -> dict:
        """What ``core.lenses.check_fits`` compares with the model decoding: the width the maps take (which rows
        exist is checked by label when a row is mapped)."""
        return {"d_model": self.d_model}

    def _index(self, rows: Sequence[RowLike]) -> list[int]:
        labels = [row.label if isinstance(row, Row) else row for row in rows]
        missing = [label for label in labels if label not in self.labels]
        if missing:
            raise LensKeyError(f"this Future Lens has no map for rows {missing}; it was trained for {self.labels}")
        return [self.labels.index(label) for label in labels]

    def transform(self, resid: Float[Tensor, "rows tokens d_model"], rows: Sequence[RowLike]) -> Tensor:
        """Map each row of ``resid`` with its own affine map, ``h + h @ W[r].T + b[r]`` (differentiable;
        float32; ``core.lenses.apply_affine``, the same arithmetic the pipeline applies to ``affine``)."""
        index = self._index(rows)
        return apply_affine(resid, self.weight[index], self.bias[index])

    def affine(self, rows: Sequence[RowLike], d_model: int) -> tuple[Tensor, Tensor]:
        """The lens seam's residual affine form: ``(weight [rows, d, d], bias [rows, d])``."""
        check_fits(self.made_for, d_model)
        index = self._index(rows)
        return self.weight[index].detach(), self.bias[index].detach()

    def save(self, path: Union[str, os.PathLike], *, overwrite: bool = False) -> None:
        """Write the maps and what they are for (rows, ``n_ahead``) to ``path``; ``FutureLens.load`` reads it back
        bit for bit. An existing file is replaced only with ``overwrite=True``, in one rename (an interrupted save
        leaves the old file whole)."""
        from lens_plugins.files import atomic_write, check_file

        check_file(path, overwrite=overwrite)
        with atomic_write(path) as staging:
            torch.save({"format": FORMAT, "labels": self.labels, "n_ahead": self.n_ahead,
                        "weight": self.weight.detach().cpu(), "bias": self.bias.detach().cpu()}, staging)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "FutureLens":
        """A lens ``save`` wrote; read as tensors and plain values only (``weights_only``): nothing in the file
        runs."""
        from lens_plugins.files import load_tensors

        state = load_tensors(path, "a saved Future Lens holds tensors, lists and strings only (FutureLens.save "
                                   "writes one)")
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise LensValueError(f"{path} is not a saved Future Lens (FutureLens.save writes one)")
        check_affine_shapes(len(state["labels"]), state["weight"], state["bias"], str(path))
        for key in ("weight", "bias"):
            check_finite_tensor(state[key], path, key)
        lens = cls(state["weight"].shape[-1], state["labels"], state["n_ahead"])
        with torch.no_grad():
            lens.weight.copy_(state["weight"])
            lens.bias.copy_(state["bias"])
        return lens


# --- reading the residual stream of a Hugging Face model -----------------------------------------------


def hf_decoder(model) -> Decoder:
    """The decoder (final norm, unembedding) of a Hugging Face causal LM, frozen, float32."""
    hf = unwrap(model)
    return Decoder.of(architectures.decoder_tensors(hf, verification.resolve(hf)))


@contextmanager
def _no_grad_params(module):
    """Freeze the model for the duration: only the lens trains."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def residual_stack(model, token_ids: Tensor) -> tuple[Tensor, list[str]]:
    """``([rows, batch, seq, d], labels)`` in float32: each decoder layer's input, then the last layer's output,
    labelled as by the logit lens ("embed", "1_pre", ..., "<L-1>_post"), read by the one Hugging Face reader
    (``backends.hf.residual_stack``: a no-grad forward of the base model, so no vocabulary-sized logits are
    made) of a causal LM or an nnsight model's underlying module."""
    hf = unwrap(model)
    stack = hf_reader.residual_stack(hf, token_ids)
    return stack.float(), [row.label for row in hf_reader.stack_rows(stack.shape[0] - 1)]


def _rows(labels: list[str], layers: Optional[Sequence[Union[int, str]]]) -> list[int]:
    if layers is None:
        return list(range(len(labels)))
    out = []
    for layer in layers:
        if isinstance(layer, str):
            if layer not in labels:
                raise LensKeyError(f"no row labelled {layer!r}; the rows are {labels}")
            out.append(labels.index(layer))
        elif -len(labels) <= layer < len(labels):
            out.append(layer % len(labels))
        else:
            raise LensIndexError(f"layer {layer} is out of range for rows 0..{len(labels) - 1}")
    return sorted(set(out))


# --- training and evaluation --------------------------------------------------------------------------------


def loss_fn(model, decoder: Decoder, vocab_chunk: int = 4096, token_chunk: int = 1024):
    """The training loss for ``train.fit``: per row, the mean KL(model's distribution at ``t + N - 1`` || the
    decoded map of the row at ``t``), yielded row by row so each row's graph is freed before the next."""
    def losses(lens: FutureLens, batch: Tensor):
        stack, labels = residual_stack(model, batch)
        index = [labels.index(label) for label in lens.labels]
        sources, targets = future.future_pairs(stack[index], stack[-1], lens.n_ahead)
        reference = vocab_loss.reference_summary(decoder.normalize(targets), decoder, vocab_chunk, token_chunk)
        for r, label in enumerate(lens.labels):
            normed = decoder.normalize(lens.transform(sources[r:r + 1], [label])[0])
            kl = vocab_loss.kl_divergence(normed, reference, decoder, vocab_chunk, token_chunk)
            yield label, kl.mean()

    return losses


@typechecked
def train_future_lens(
    model,
    tokenizer,
    n_ahead: int,
    *,
    layers: Optional[Sequence[Union[int, str]]] = None,
    texts: train.TextSource = None,
    seq_len: int = 64,
    heldout: float = 0.1,
    config: train.TrainConfig = train.TrainConfig(),
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    progress: bool = False,
) -> tuple[FutureLens, list[dict], Int[Tensor, "heldout seq"], Int[Tensor, "train seq"]]:
    """Fit a Future Lens for ``n_ahead`` on a Hugging Face causal LM (or an nnsight model's module).

    ``texts`` are ``train.load_texts`` sources (default the offline ``pydoc_data.topics`` corpus), cut into
    ``seq_len``-token blocks; a seeded ``heldout`` fraction is set aside. ``config`` is the tuned-lens recipe
    (``train.TrainConfig``); ``checkpoint`` a directory to save to and resume from. Returns the lens, the
    training history, and the held-out and training blocks (for ``evaluate`` and ``bigram_table``)."""
    hf = unwrap(model)
    blocks = train.token_blocks(train.load_texts(texts), tokenizer, seq_len)
    train_blocks, held = train.split_heldout(blocks, heldout, config.seed)
    _, labels = residual_stack(hf, train_blocks[:1, :2])
    lens = FutureLens(hf_decoder(hf).d_model, [labels[i] for i in _rows(labels, layers)], n_ahead)
    hf.eval()
    with _no_grad_params(hf):
        torch.manual_seed(config.seed)
        history = train.fit(lens, train_blocks, loss_fn(hf, hf_decoder(hf)), config, checkpoint=checkpoint,
                            progress=progress, description=f"future lens N={n_ahead}")
    return lens, history, held, train_blocks


@dataclass
class FutureLensEval:
    """Per row of a Future Lens on held-out blocks: top-1 agreement with the model's own prediction at
    ``t + N - 1`` (``top1``), mean KL from it (``kl``, the training loss), and the bigram baseline's agreement."""

    labels: list[str]
    n_ahead: int
    top1: Tensor
    kl: Tensor
    bigram_top1: Optional[float]
    n_tokens: int


@typechecked
def evaluate(
    lens: FutureLens,
    model,
    blocks: Int[Tensor, "n seq"],
    *,
    bigram: Optional[Int[Tensor, "vocab"]] = None,
    batch_size: int = 8,
    vocab_chunk: Optional[int] = 4096,
    token_chunk: Optional[int] = 256,
) -> FutureLensEval:
    """Evaluate ``lens`` on ``blocks`` with the streamed readout: each row's mapped state, with the model's own
    final residual at ``t + N - 1`` as the reference row (so ``kl_final_row`` is the held-out loss and
    ``final_top1`` the model's prediction)."""
    hf = unwrap(model)
    decoder = hf_decoder(hf)
    check_fits(lens.made_for, decoder.d_model, decoder=decoder)
    hits = torch.zeros(len(lens.labels))
    kl = torch.zeros(len(lens.labels))
    bigram_hits, n = 0, 0
    for b0 in range(0, len(blocks), batch_size):
        batch = blocks[b0:b0 + batch_size]
        stack, labels = residual_stack(hf, batch)
        sources, targets = future.future_pairs(stack[[labels.index(label) for label in lens.labels]], stack[-1],
                                               lens.n_ahead)
        with torch.no_grad():
            mapped = lens.transform(sources, lens.labels)
        check_output(mapped, [Row.parse(label) for label in lens.labels])
        stats = decoder.statistics(torch.cat([mapped, targets.unsqueeze(0)]), torch.zeros(targets.shape[0], 0, dtype=torch.long),
                                   1, vocab_chunk, token_chunk, ("top_k", "kl_final_row", "final_top1"))
        own = stats["final_top1"]
        hits += (stats["top_ids"][:-1, :, 0] == own).sum(-1)
        kl += stats["kl_final_row"][:-1].sum(-1)
        if bigram is not None:
            span = batch.shape[1] - lens.n_ahead + 1
            bigram_hits += int((bigram[batch[:, :span].reshape(-1)] == own).sum())
        n += targets.shape[0]
    return FutureLensEval(labels=list(lens.labels), n_ahead=lens.n_ahead, top1=hits / n, kl=kl / n,
                          bigram_top1=bigram_hits / n if bigram is not None else None, n_tokens=n)


def bigram_table(blocks: Tensor, n_ahead: int, vocab: int) -> Tensor:
    """The bigram baseline for ``n_ahead`` (``core.future.bigram_table``): token ``t`` -> its most frequent
    successor ``N`` positions later in ``blocks``."""
    return future.bigram_table(blocks, n_ahead, vocab)


# --- a prompt's Future Lens as a LensResult -------------------------------------------------------------------

RESULT_REDUCTIONS = ("top_k", "entropy", "kl_final_row", "kl_row_final", "final_top1", "next_token")


@typechecked
def lens_result_from_stack(
    lens: FutureLens,
    stack: Float[Tensor, "row batch seq d_model"],
    labels: list[str],
    decoder: Decoder,
    token_ids: Int[Tensor, "batch seq"],
    tokenizer,
    *,
    top_k: int = TOP_K,
    targets: Sequence[Union[str, int]] = (),
    vocab_chunk: Optional[int] = DEFAULT_VOCAB_CHUNK,
    token_chunk: Optional[int] = DEFAULT_TOKEN_CHUNK,
) -> LensResult:
    """The Future Lens of one residual stack (``cache.lens.stack()`` on TransformerLens, ``residual_stack`` on a
    Hugging Face model) as a ``LensResult``: rows are the lens's rows, positions ``t = 0 .. seq - N``, and each
    row at ``t`` is the lens's prediction of token ``t + N``. The reference ("final") is the model's own final
    state at ``t + N - 1``, so ``final_top1`` is the model's prediction of token ``t + N`` and ``kl_final_row``
    the lens's loss; ``next_token`` is the actual token ``t + N``."""
    n = lens.n_ahead
    batch, seq = token_ids.shape
    if seq < n + 1:
        raise LensValueError(f"a prompt of {seq} tokens has no token {n} positions ahead of its first: give a longer prompt")
    missing = [label for label in lens.labels if label not in labels]
    if missing:
        raise LensKeyError(f"the stack has no rows {missing} (its rows are {labels}); the lens maps {lens.labels}")
    check_fits(lens.made_for, decoder.d_model, decoder=decoder)
    sources, targets_ = future.future_pairs(stack[[labels.index(label) for label in lens.labels]], stack[-1], n)
    with torch.no_grad():
        mapped = lens.transform(sources, lens.labels)
    check_output(mapped, [Row.parse(label) for label in lens.labels])
    span = seq - n + 1
    ahead = torch.full((batch, span), -1, dtype=torch.long)  # the actual token t + N, none past the prompt
    ahead[:, : seq - n] = token_ids[:, n:]
    user = [single_token_id(tokenizer, t, decoder.d_vocab) for t in targets]
    columns = torch.cat([ahead.reshape(-1, 1), torch.tensor(user, dtype=torch.long).expand(batch * span, -1)], -1)
    stats = decoder.statistics(torch.cat([mapped, targets_.unsqueeze(0)]), columns, top_k, vocab_chunk, token_chunk,
                               ("top_k", "entropy", "kl_final_row", "kl_row_final", "final_top1", "targets"))
    stats = {name: value if name == "final_top1" else value[:-1] for name, value in stats.items()}
    request = LensRequest(positions=list(range(span)), reductions=RESULT_REDUCTIONS,
                          target_names=[t if isinstance(t, str) else tokenizer.decode([t]) for t in targets],
                          target_ids=user, set_names=[], set_ids=[], top_k=top_k)
    return assemble(stats, request, list(lens.labels), token_ids.cpu(), tokenizer)


@typechecked
def lens_result(lens: FutureLens, model, token_ids: Int[Tensor, "batch seq"], tokenizer, **kwargs) -> LensResult:
    """``lens_result_from_stack`` on a Hugging Face causal LM (or an nnsight model's module) run on ``token_ids``."""
    hf = unwrap(model)
    stack, labels = residual_stack(hf, token_ids)
    return lens_result_from_stack(lens, stack, labels, hf_decoder(hf), token_ids, tokenizer, **kwargs)

__all__ = ["FORMAT", "RowLike", "FutureLens", "hf_decoder", "residual_stack", "loss_fn", "train_future_lens",
    "FutureLensEval", "evaluate", "bigram_table", "RESULT_REDUCTIONS", "lens_result_from_stack", "lens_result"]
