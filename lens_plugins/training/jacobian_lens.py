"""Fitting a Jacobian lens: the exact estimator over prompts, resumable, on either backend.

The driver is written once: a backend only supplies ``block_outputs(ids, layers, prefix)``, the outputs of the
requested blocks on one autograd graph rooted at the earliest of them (TransformerLens: ``blocks.{l}.hook_out``
hooks of a raw ``TransformerBridge``; nnsight or Hugging Face: forward hooks on the decoder layers, the same
points the nnsight lens reads). ``core.jacobian.prompt_jacobians`` turns one prompt's graph into its matrices.
The graph covers only the positions the estimator uses: the skipped prefix is read through the model's
key/value cache (checked against a full forward on the first prompt; not on a TransformerBridge, whose cache
stays empty under transformers 5) and the last token is dropped.

Prompts contribute equally: each prompt's matrix is its source-position mean, and the lens is the mean over
prompts, accumulated as float32 running sums (the reference checkpoint layout: ``jacobian_sum``, ``n_done``,
``next_idx``, ``source_layers``, ``target_layer``, ``skip_first``, ``metadata``), so a resumed fit adds the same
numbers in the same order as an uninterrupted one and ends bit-identical.

``mid_layers=`` also fits ``J_mid[l] = d h_final / d h_mid,l`` for the residual between block ``l``'s attention
and MLP, by the same estimator on the same graph (a backend's ``block_outputs`` returns those points after
the block outputs; the checkpoint holds their sums under ``jacobian_sum_mid``).
"""

import contextlib
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from lens_plugins.backends import kind
from lens_plugins.backends._common import eval_mode, prompt_ids
from lens_plugins.backends.hf import block_outputs as hf_block_outputs
from lens_plugins.backends.hf import hf_model
from lens_plugins.core import jacobian as core_jacobian
from lens_plugins.core.errors import LensTypeError, LensValueError
from lens_plugins.core.lenses import fingerprint
from lens_plugins.files import atomic_write, check_file, load_tensors
from lens_plugins.lenses.jacobian import DEFAULT_SKIP_FIRST, ESTIMATOR, JacobianLens, check_metadata, decoder_of
from lens_plugins.training.loop import _Interrupts, builtin_corpus, load_texts

CHECKPOINT_EVERY = 25  # prompts between checkpoints (also at the end and on Ctrl-C / SIGTERM)
# Keys of the recipe: a checkpoint made with other values is refused rather than mixed into this fit.
RECIPE = ("estimator", "corpus", "target_layer", "max_seq_len", "skip_first_positions", "prepend_bos",
          "model_fingerprint")


class _Frozen:
    """Parameters frozen for the fit (``requires_grad=False``) and restored after: the graph then starts at the
    earliest source block's output, so the backward passes run only through the blocks above it and make no
    weight gradients."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.saved: list[tuple[torch.nn.Parameter, bool]] = []

    def __enter__(self):
        self.saved = [(p, p.requires_grad) for p in self.module.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in self.saved:
            p.requires_grad_(flag)


def _reader(model) -> tuple[Callable, bool, torch.nn.Module, object, str]:
    """``(block_outputs(ids, layers, prefix, mid_layers), whether it can read a prefix through the cache, module
    to freeze, tokenizer, model name)`` for ``model``."""
    try:
        backend = kind(model)
    except LensTypeError:
        backend = "hf"
    if backend == "transformer_lens":
        from lens_plugins.backends.transformer_lens.jacobian import block_outputs, check_raw

        check_raw(model)
        # TransformerLens 4.3's bridge fills no key/value cache under transformers 5 (a prefix passed through it
        # leaves the cache empty), so a bridge fit reads the whole prompt
        return (lambda ids, layers, prefix, mids=(): block_outputs(model, ids, layers, mids)), False, model, \
            model.tokenizer, \
            str(getattr(model.cfg, "model_name", "") or "")
    hf = hf_model(model)
    name = str(getattr(hf.config, "name_or_path", "") or "")
    if os.path.isdir(name):
        name = Path(name).name  # a local copy: its directory's name, as TransformerLens names a booted model
    return (lambda ids, layers, prefix, mids=(): hf_block_outputs(hf, ids, layers, prefix=prefix, mid_layers=mids)), \
        True, hf, \
        getattr(model, "tokenizer", None), name


def _prompt_matrices(read, ids, layers, target_layer, skip_first, chunk, cached, mid_layers=()):
    """One prompt's ``[d, d]`` matrices. Only positions ``skip_first .. seq - 2`` are sources or targets, so the
    graph is built over those alone: the last token is dropped (nothing before it depends on it) and, when
    ``cached``, the skipped prefix runs once without grad and is read through the model's key/value cache.
    The backward passes, which are the fit's cost, then run over ``seq - 1 - skip_first`` positions, not
    ``seq``; the matrices are the same up to float32 rounding. The matrices of ``mid_layers`` follow those of
    ``layers``."""
    tokens = torch.tensor([ids[:-1]])
    prefix = skip_first if cached else 0
    outputs = read(tokens, layers + [target_layer], prefix, list(mid_layers))
    positions = range(skip_first - prefix, len(ids) - 1 - prefix)
    target = outputs[len(layers)]
    sources = outputs[:len(layers)] + outputs[len(layers) + 1:]
    return core_jacobian.prompt_jacobians(target, sources, list(positions), chunk)


def _cache_agrees(read, ids, target_layer, skip_first) -> bool:
    """Whether the last block's output read through the cached prefix equals a full forward's at the source
    positions (to float32 rounding, far below any structural error such as shifted positions). Checked once per
    fit, on its first prompt; a family whose cache does not reproduce its forward is fitted without it."""
    if not skip_first:
        return False
    tokens = torch.tensor([ids[:-1]])
    try:
        with torch.no_grad():
            cached = read(tokens, [target_layer], skip_first)[0].detach()
            full = read(tokens, [target_layer], 0)[0][:, skip_first:].detach()
    except Exception:  # noqa: BLE001 - a family whose forward takes no cache is fitted without one
        return False
    scale = float(full.abs().max())
    return cached.shape == full.shape and float((cached - full).abs().max()) <= 1e-4 * scale + 1e-6


def _prompts(texts, tokenizer, max_seq_len: int, prepend_bos: Optional[bool]) -> list[list[int]]:
    if isinstance(texts, torch.Tensor):
        if texts.ndim != 2:
            raise LensValueError(f"token prompts must be [prompts, seq], got shape {tuple(texts.shape)}")
        return [row[:max_seq_len].tolist() for row in texts]
    if tokenizer is None:
        raise LensValueError("this model carries no tokenizer: pass tokenizer=, or give token ids [prompts, seq]")
    texts = builtin_corpus() if texts is None else load_texts(texts) if isinstance(texts, (str, os.PathLike)) \
        else list(texts)
    return [prompt_ids(tokenizer, text, prepend_bos)[:max_seq_len] for text in texts]


def _fit_far(model, ids, layers, positions, chunk, remote, backend):
    """One prompt's matrices fitted where the nnsight model runs: a trace whose body takes the backward passes
    there and saves only ``[layers, d, d]``."""
    from lens_plugins.backends.nnsight._run import remote_error
    from lens_plugins.core.trace.jacobian import fit_prompt

    tokens = torch.tensor([ids])
    inputs = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    kwargs = {"remote": remote} if backend is None else {"backend": backend}
    try:
        with model.trace(inputs, **kwargs):
            saved = fit_prompt(model, layers, positions, chunk)
    except Exception as error:  # noqa: BLE001 - named as a remote failure when it is one
        raise remote_error(error, remote, backend) from error
    return saved.float()


def fit_jacobian_lens(
    model,
    texts=None,
    *,
    tokenizer=None,
    source_layers: Optional[Sequence[int]] = None,
    mid_layers: Optional[Sequence[int]] = None,
    max_prompts: Optional[int] = 64,
    max_seq_len: int = 128,
    skip_first: int = DEFAULT_SKIP_FIRST,
    chunk: int = 16,
    prepend_bos: Optional[bool] = None,
    corpus: Optional[str] = None,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: int = CHECKPOINT_EVERY,
    progress: bool = False,
    metadata: Optional[dict] = None,
    remote: Union[bool, str] = False,
    backend=None,
) -> JacobianLens:
    """Fit a Jacobian lens on ``model`` (a raw ``TransformerBridge``, an nnsight model or a Hugging Face causal LM).

    Args:
        texts: prompts (strings, a text source as in ``TunedLens.train``, or token ids ``[prompts, seq]``);
            ``None``: the built-in corpus (Python's own documentation).
        tokenizer: for a plain Hugging Face model (the other two carry theirs).
        source_layers: blocks to fit (default: every block but the last, whose output is decoded as it is).
        mid_layers: blocks whose ``mid`` residual (between attention and MLP) gets a matrix too, ``J_mid``
            (``range(n_layers)`` for all, the last block included; default none). Not with ``remote=``.
        max_prompts: the first this many prompts long enough to count (``None``: all); the reference notes that
            ~100 prompts of 128 tokens already give a usable lens.
        max_seq_len: prompts are cut to this many tokens.
        skip_first: leading positions left out of the source average (attention sinks); 16 as the reference.
        chunk: output dimensions per backward pass (batched by ``is_grads_batched``): memory grows as ``chunk``
            copies of the backward's activations, never ``[d, tokens, d]`` unless ``chunk >= d_model``; on a CPU 16
            and 64 measured the same speed (``benchmarks/bench_jacobian_lens.py``), 16 at about a third of the memory.
        prepend_bos: the tokenization rule of every one-call form (``None``: the tokenizer's own).
        corpus: a name for the prompts, recorded in the metadata (default: ``"builtin"`` or ``"user"``).
        checkpoint: a file for the running sums (the reference checkpoint layout), written every
            ``checkpoint_every`` prompts, at the end and on Ctrl-C or SIGTERM; a fit finding one resumes it.
        progress: a progress bar over prompts (off by default, as everywhere in the package).
        metadata: extra provenance (plain values) recorded with the lens.
        remote: nnsight models only: ``True`` fits where the model runs (NDIF), one trace per prompt whose body
            takes the backward passes on the server (``core.trace.jacobian.fit_prompt``) and sends back only that
            prompt's matrices; ``"local"`` runs the same serialised request here. ``backend`` as for a trace.

    Returns:
        The fitted ``JacobianLens`` (float32 matrices, ``n_prompts`` the prompts that counted).

    Raises:
        LensValueError: a bad option, no prompt long enough, or a checkpoint made with another recipe.
    """
    read, caches, module, tokenizer_of_model, model_name = _reader(model)
    far = remote is not False or backend is not None
    if far and kind(model) != "nnsight":
        raise LensValueError("remote= fits an nnsight model where it runs (NDIF); a TransformerBridge or a plain "
                             "Hugging Face model fits here (remote=False)")
    tokenizer = tokenizer or tokenizer_of_model
    hf = hf_model(model)
    n_layers = hf.config.num_hidden_layers
    d_model = hf.config.hidden_size
    target_layer = n_layers - 1
    if source_layers is None:
        layers = list(range(target_layer))
    else:
        layers = sorted({layer + n_layers if isinstance(layer, int) and layer < 0 else layer for layer in source_layers})
        if not layers or any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < target_layer for x in layers):
            raise LensValueError(f"source_layers={list(source_layers)}: give block indices in 0..{target_layer - 1} "
                                 "(the last block's output is decoded as it is)")
    if mid_layers is None:
        mids = []
    else:
        mids = sorted({layer + n_layers if isinstance(layer, int) and layer < 0 else layer for layer in mid_layers})
        if any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n_layers for x in mids):
            raise LensValueError(f"mid_layers={list(mid_layers)}: give block indices in 0..{n_layers - 1}")
        if mids and far:
            raise LensValueError("mid_layers= fits here only (the remote fit reads block outputs alone): fit with "
                                 "remote=False, or drop mid_layers")
    for name, value, low in (("chunk", chunk, 1), ("max_seq_len", max_seq_len, 2), ("skip_first", skip_first, 0),
                             ("checkpoint_every", checkpoint_every, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LensValueError(f"{name}={value!r}: give an integer >= {low}")
    if max_prompts is not None and (not isinstance(max_prompts, int) or max_prompts < 1):
        raise LensValueError(f"max_prompts={max_prompts!r}: give a positive integer, or None for every prompt")
    check_metadata(metadata)
    dtype = next(module.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16):
        warnings.warn(f"fitting a {dtype} model: the backward passes run in {dtype}; load the model in float32 for "
                      "the most accurate lens (the matrices are accumulated in float32 either way)", stacklevel=2)
    provenance = {
        "model_name": model_name, "estimator": ESTIMATOR,
        "corpus": corpus or ("builtin" if texts is None else "user"),
        "fit_dtype": str(dtype).removeprefix("torch."), "target_layer": target_layer, "dim_batch": chunk,
        "max_seq_len": max_seq_len, "skip_first_positions": skip_first, "hook_convention": "blocks.{layer}.hook_out",
        "prepend_bos": prepend_bos, "model_fingerprint": fingerprint(decoder_of(model)), "fitted_by": "lens_plugins",
    }
    reserved = sorted(set(provenance) & set(metadata or {}))
    if reserved:
        raise LensValueError(f"metadata cannot set {reserved}: the fit records them itself")
    provenance = {**(metadata or {}), **provenance}
    prompts = _prompts(texts, tokenizer, max_seq_len, prepend_bos)

    state_path = check_file(checkpoint, overwrite=True) if checkpoint is not None else None
    sums = {layer: torch.zeros(d_model, d_model) for layer in layers}
    mid_sums = {layer: torch.zeros(d_model, d_model) for layer in mids}
    n_done, next_idx = 0, 0
    if state_path is not None and state_path.exists():
        state = load_tensors(state_path, f"delete {state_path} to fit from the start")
        recorded = state.get("metadata") or {}
        changed = [k for k in RECIPE if recorded.get(k) != provenance.get(k)]
        if sorted(state.get("source_layers", [])) != layers:
            changed.append("source_layers")
        if sorted(state.get("mid_layers", [])) != mids:
            changed.append("mid_layers")
        if changed:
            raise LensValueError(f"the checkpoint {state_path} was made with other settings ({changed} differ): "
                                 "resume with the same ones, or give another checkpoint file")
        sums = {int(layer): total.float() for layer, total in state["jacobian_sum"].items()}
        mid_sums = {int(layer): total.float() for layer, total in (state.get("jacobian_sum_mid") or {}).items()}
        n_done, next_idx = int(state["n_done"]), int(state["next_idx"])
        print(f"Jacobian lens: resuming from {state_path} ({n_done} prompts done)", file=sys.stderr)

    def save_state():
        payload = {"jacobian_sum": sums, "n_done": n_done, "next_idx": next_idx, "source_layers": layers,
                   "target_layer": target_layer, "skip_first": skip_first, "metadata": {**provenance, "n_prompts": n_done}}
        if mids:
            payload["jacobian_sum_mid"] = mid_sums
            payload["mid_layers"] = mids
        with atomic_write(state_path) as staging:
            torch.save(payload, staging)

    wanted = len(prompts) if max_prompts is None else max_prompts
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=min(wanted, len(prompts)), initial=n_done, desc="fitting the Jacobian lens", unit="prompt")
    interrupts = _Interrupts()
    skipped = 0
    cached = None  # whether the prefix cache reproduces the forward: settled on the first prompt
    try:
        with interrupts, eval_mode(module), (contextlib.nullcontext() if far else _Frozen(module)):
            while next_idx < len(prompts) and n_done < wanted:
                ids = prompts[next_idx]
                positions = core_jacobian.valid_positions(len(ids), skip_first)
                if not positions:
                    skipped += 1
                    next_idx += 1
                    continue
                if far:
                    per_prompt = list(_fit_far(model, ids, layers, positions, chunk, remote, backend))
                else:
                    if cached is None:
                        cached = caches and _cache_agrees(read, ids, target_layer, skip_first)
                    per_prompt = _prompt_matrices(read, ids, layers, target_layer, skip_first, chunk, cached, mids)
                with interrupts.update():
                    for layer, matrix in zip(layers, per_prompt):
                        sums[layer] += matrix
                    for layer, matrix in zip(mids, per_prompt[len(layers):]):
                        mid_sums[layer] += matrix
                    n_done += 1
                    next_idx += 1
                if bar is not None:
                    bar.update(1)
                if state_path is not None and checkpoint_every and n_done % checkpoint_every == 0:
                    save_state()
    except KeyboardInterrupt:
        if state_path is not None:
            save_state()
            print(f"Jacobian lens: interrupted after {n_done} prompts; the sums are in {state_path}: run the same "
                  "call again to resume", file=sys.stderr)
        if interrupts.signal == signal.SIGTERM:
            signal.raise_signal(signal.SIGTERM)  # to the handler it had before (by default: terminate)
        raise
    finally:
        if bar is not None:
            bar.close()
    if state_path is not None:
        save_state()
    if skipped:
        warnings.warn(f"{skipped} prompt(s) had at most skip_first + 1 = {skip_first + 1} tokens and were skipped",
                      stacklevel=2)
    if n_done == 0:
        raise LensValueError(f"no prompt had more than skip_first + 1 = {skip_first + 1} tokens: nothing was fitted "
                             "(give longer prompts, or lower skip_first)")
    provenance["n_prompts"] = n_done
    return JacobianLens({layer: sums[layer] / n_done for layer in layers}, n_prompts=n_done, d_model=d_model,
                        metadata=provenance, mid_jacobians={layer: mid_sums[layer] / n_done for layer in mids})

__all__ = ["CHECKPOINT_EVERY", "RECIPE", "fit_jacobian_lens"]
