"""Training a ``TunedLens``: the tuned-lens loss on top of the generic loop of ``lens_plugins.training.loop``.

Each micro-batch runs the frozen model once (hooks read hidden states ``0 .. n_layers``), then, layer by
layer, translates hidden state ``i``, applies the final norm and takes the loss over the whole vocabulary with
``core.vocab_loss`` (tile by tile, never ``[tokens, vocab]``): KL(final || lens) at the same position by
default, as in the paper, or cross-entropy to the next token (``loss="ce"``). Each layer's loss is
back-propagated before the next is built, so memory holds one layer's ``[tokens, d_model]`` graph.

A lens with mid-block translators (``resid_mid=True``) is trained on its ``{l}_mid`` rows too, with the same
loss, read in the same forward pass (``backends.hf.residual_rows``): the rows are those of
``core.rows.plan(n_layers, resid_mid=True)``, each translated row's loss back-propagated in stream order.
"""

from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from lens_plugins.backends.hf import decoder_tensors, hf_model, residual_rows
from lens_plugins.core import vocab_loss
from lens_plugins.core.errors import LensValueError
from lens_plugins.core.readout import DecoderTensors
from lens_plugins.core.rows import plan
from lens_plugins.files import check_dir
from lens_plugins.lenses.tuned import TunedLens
from lens_plugins.training import loop as train

DEFAULT_SEQ_LEN = 256


def tuned_lens_losses(lens: TunedLens, hf, decoder: DecoderTensors, input_ids: torch.Tensor, loss: str = "kl",
                      vocab_chunk: int = 4096, token_chunk: int = 1024, matmul_dtype: torch.dtype = torch.float32):
    """Yield ``(row label, mean loss)`` for every translated row of a batch of token blocks ``[batch, seq]``
    (hidden states ``0 .. n_layers - 1``, and each block's ``{l}_mid`` row for a lens with mid translators), in
    stream order: the per-row losses ``train.fit`` back-propagates one by one."""
    rows = plan(hf.config.num_hidden_layers, resid_mid=lens.resid_mid)
    stack = residual_rows(hf, input_ids, rows)
    d_model = stack.shape[-1]
    unembedding = replace(decoder, W_U=decoder.W_U.to(matmul_dtype))  # cast once, not per row
    if loss == "kl":
        final = decoder.normalize(stack[-1].reshape(-1, d_model))
        target = vocab_loss.reference_summary(final, unembedding, vocab_chunk, token_chunk, matmul_dtype)
    else:
        target = input_ids[:, 1:].reshape(-1)
    for index, row in enumerate(rows[:-1]):
        h = stack[index]
        if loss == "ce":
            h = h[:, :-1]  # the last position has no next token in the block
        normed = decoder.normalize(lens.transform_row(h.reshape(-1, d_model), row))
        if loss == "kl":
            value = vocab_loss.kl_divergence(normed, target, unembedding, vocab_chunk, token_chunk)
        else:
            value = vocab_loss.cross_entropy(normed, target, unembedding, vocab_chunk, token_chunk, matmul_dtype)
        yield row.label, value.mean()


def token_blocks_of(model, texts, seq_len: int) -> torch.Tensor:
    """``[blocks, seq]`` token ids: ``texts`` as they are if already an integer tensor of blocks, else a text
    source tokenised with the model's tokenizer and cut into ``seq_len`` blocks."""
    if isinstance(texts, torch.Tensor):
        if texts.dim() != 2 or texts.is_floating_point() or texts.shape[1] < 2:
            raise LensValueError(f"token blocks must be an integer tensor [blocks, seq >= 2], got {texts.dtype} "
                             f"{tuple(texts.shape)}")
        return texts.long()
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise LensValueError("reading text needs the model's tokenizer: pass an nnsight or TransformerLens model, an HF "
                         "model with a .tokenizer attribute, or token blocks [blocks, seq]")
    return train.token_blocks(train.load_texts(texts), tokenizer, seq_len)


def shortcut_init(lens: TunedLens, hf, blocks: torch.Tensor, batch_size: int = 1, ridge: float = 1e-4) -> None:
    """Set every translator to the least-squares linear map from its hidden state to the final one (Din et
    al. 2023, "Jump to conclusions"), a cheap start for KL training: a few matmuls of ``d_model x d_model``
    per token where the KL gradient costs two of ``d_model x vocab`` per token and row.

    The final norm makes the decoder blind to scale, so the target is the final hidden state at the input's
    RMS, ``h_L * rms(h_i) / rms(h_L)``; ``ridge`` (relative to the mean input energy) keeps the solve stable.
    A lens's mid-block translators, if it has them, are fitted the same way from their rows.
    """
    rows = plan(lens.num_hidden_layers, resid_mid=lens.resid_mid)
    fitted = len(rows) - 1
    d = lens.d_model
    gram = torch.zeros(fitted, d + 1, d + 1, dtype=torch.float64)
    cross = torch.zeros(fitted, d + 1, d, dtype=torch.float64)
    for start in range(0, len(blocks), batch_size):
        stack = residual_rows(hf, blocks[start:start + batch_size], rows).float().reshape(len(rows), -1, d)
        rms = stack.pow(2).mean(-1, keepdim=True).sqrt()
        unit_final = stack[-1] / rms[-1]
        ones = torch.ones(stack.shape[1], 1)
        for i in range(fitted):
            x = torch.cat([stack[i], ones], -1)
            gram[i] += (x.T @ x).double()
            cross[i] += (x.T @ (unit_final * rms[i])).double()
    eye = torch.eye(d + 1, dtype=torch.float64)
    with torch.no_grad():
        for i, row in enumerate(rows[:-1]):
            translator = lens.translator(row)
            scale = ridge * gram[i].diagonal()[:d].mean()
            solution = torch.linalg.solve(gram[i] + scale * eye, cross[i])  # [d + 1, d]: x @ solution ~ target
            translator.weight.copy_((solution[:d].T - torch.eye(d, dtype=torch.float64)).float())
            if translator.bias is not None:
                translator.bias.copy_(solution[d].float())


def train_tuned_lens(
    model,
    texts: Union[train.TextSource, torch.Tensor] = None,
    *,
    steps: int = 250,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 1,
    accumulate: int = 1,
    loss: Literal["kl", "ce"] = "kl",
    lr: float = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    clip_grad_norm: Optional[float] = 1.0,
    warmup_steps: int = 0,
    heldout: float = 0.1,
    seed: int = 0,
    lens: Optional[TunedLens] = None,
    resid_mid: bool = False,
    init: Literal["zero", "shortcut"] = "zero",
    shortcut_blocks: int = 32,
    checkpoint: Optional[str] = None,
    checkpoint_every: int = train.CHECKPOINT_EVERY,
    progress: bool = False,
    vocab_chunk: int = 4096,
    token_chunk: int = 1024,
    matmul_dtype: torch.dtype = torch.float32,
) -> TunedLens:
    """Train a tuned lens for ``model`` (HF, nnsight or TransformerBridge; frozen throughout) on ``texts``
    (a list of strings, a .txt / .jsonl path, ``None`` for the built-in offline corpus, or token blocks
    ``[blocks, seq]``).

    The text is cut into ``seq_len``-token blocks and a seeded ``heldout`` fraction is set aside (returned as
    ``lens.heldout_blocks``, for ``evaluate_lenses``); each step trains on ``accumulate x batch_size`` blocks.
    The defaults are tuned-lens's recipe (``lens_plugins.training.loop``). ``checkpoint`` (a directory) makes the run
    resumable: the state is saved there every ``checkpoint_every`` steps, at the end and on Ctrl-C or SIGTERM;
    rerun the same call after an interruption and it continues where it stopped. The same seed
    gives the same lens. ``lens.history`` holds every step's per-row losses. ``matmul_dtype=torch.bfloat16``
    runs the vocabulary matmuls of the loss in bfloat16 (as tuned-lens's autocast does; about 3x faster on a
    CPU with bfloat16 units), everything else in float32. ``init="shortcut"`` starts the translators at the
    least-squares maps of ``shortcut_init`` (fitted on ``shortcut_blocks`` training blocks) instead of zero
    (the paper's start, where an untrained lens is the logit lens): a better start when the budget allows only
    a few KL steps, e.g. on a CPU. ``resid_mid=True`` trains a translator for each block's ``{l}_mid`` row too
    (between attention and MLP; saved in ``mid_params.pt`` beside tuned-lens's files), with the same loss.

    Args:
        model: a Hugging Face, nnsight or TransformerLens model (frozen).
        texts: a list of strings, a .txt / .jsonl path, ``None`` (built-in corpus) or token blocks.
        steps: optimiser steps.
        seq_len: tokens per block.
        batch_size: blocks per forward pass.
        accumulate: forward passes per step.
        loss: ``"kl"`` (to the final layer) or ``"ce"`` (next token).
        lr: learning rate, before the ``(1 - momentum)`` factor.
        momentum: Nesterov momentum.
        weight_decay: SGD weight decay.
        clip_grad_norm: gradient-norm clip; ``None`` for none.
        warmup_steps: linear warm-up steps.
        heldout: the fraction of blocks held out.
        seed: fixes the split, the order and hence the lens.
        lens: a lens to continue training; default a zero lens.
        resid_mid: also train mid-block translators (a new lens gets them; a given lens must have them).
        init: ``"zero"`` (the logit lens) or ``"shortcut"`` (least-squares start).
        shortcut_blocks: blocks the shortcut start is fitted on.
        checkpoint: a directory that makes the run resumable.
        checkpoint_every: steps between saves of the state.
        progress: show a progress bar.
        vocab_chunk: vocabulary columns per tile of the loss.
        token_chunk: tokens per tile of the loss.
        matmul_dtype: ``torch.bfloat16`` runs the loss's matmuls in bfloat16.

    Returns:
        The trained ``TunedLens`` (``lens.heldout_blocks``, ``lens.history``).

    Raises:
        LensValueError: bad sizes, too little text, a checkpoint of another run.
    """
    if loss not in ("kl", "ce"):
        raise LensValueError(f"loss must be 'kl' (to the final layer, the paper's) or 'ce' (to the next token), got {loss!r}")
    if checkpoint is not None:
        check_dir(checkpoint, overwrite=True)  # before tokenising and the shortcut start, not after
    hf = hf_model(model)
    config = train.TrainConfig(steps=steps, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               clip_grad_norm=clip_grad_norm, warmup_steps=warmup_steps, batch_size=batch_size,
                               accumulate=accumulate, seed=seed, checkpoint_every=checkpoint_every)
    blocks = token_blocks_of(model, texts, seq_len)
    train_blocks, heldout_blocks = train.split_heldout(blocks, heldout, seed)
    if init not in ("zero", "shortcut"):
        raise LensValueError(f"init must be 'zero' (the paper's) or 'shortcut' (least squares), got {init!r}")
    resuming = checkpoint is not None and (Path(checkpoint) / train.STATE_FILE).exists()
    if lens is None:
        lens = TunedLens.for_model(hf, resid_mid=resid_mid)
    elif resid_mid and not lens.resid_mid:
        raise LensValueError("resid_mid=True trains mid-block translators, but the lens given has none: make it with "
                             "TunedLens.for_model(model, resid_mid=True), or drop resid_mid")
    lens.check_model(hf)
    if init == "shortcut" and not resuming:  # a resumed run restores its translators from the checkpoint
        shortcut_init(lens, hf, train_blocks[:shortcut_blocks], batch_size)
    decoder = decoder_tensors(hf)
    was_training = hf.training
    hf.eval()
    frozen = [p for p in hf.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        history = train.fit(
            lens, train_blocks,
            lambda module, batch: tuned_lens_losses(module, hf, decoder, batch, loss, vocab_chunk, token_chunk,
                                                            matmul_dtype),
            config, checkpoint=checkpoint, progress=progress, description="tuned lens",
        )
    finally:
        for p in frozen:
            p.requires_grad_(True)
        hf.train(was_training)
    lens.history = history
    lens.heldout_blocks = heldout_blocks
    return lens

__all__ = ["DEFAULT_SEQ_LEN", "tuned_lens_losses", "token_blocks_of", "shortcut_init", "train_tuned_lens"]
