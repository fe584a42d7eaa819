"""Streamed decoding of a residual stack into lens statistics, tile by tile.

This module is the part of lens_plugins that runs where the activations live: on the
caller's machine for a TransformerLens cache, on the NDIF server for a remote nnsight
trace. It therefore imports nothing but torch, takes every input as an argument
(tensors, numbers, strings) and carries no decorators: nnsight ships these functions
by source and rebuilds them without their module's globals or type checkers.

The cost of a full logit lens is the unembedding, ``rows x tokens x d_model x vocab``
multiply-adds, and then every statistic wants another pass over the same logits.
``lens_statistics`` treats the stack ``[rows, tokens, d_model]`` as one matrix of
``rows x tokens`` vectors and produces its logits one tile (a block of tokens with all
their rows, by a chunk of the vocabulary) at a time: one matmul per tile, so that each
``W_U`` chunk is reused by ``M = rows x block`` vectors while it is in cache (a per-row
matmul re-reads all of ``W_U`` for every row), and every reduction is one vectorised op
over the whole tile. Each tile is consumed while it is still in cache: one fused softmax,
whose results enter running sums kept relative to a running max (an online softmax), a
dot product per expectation a statistic needs, a merged running top-k and running rank
counts, so that no ``[rows, tokens, vocab]`` tensor ever exists.

Conventions: the last row of the stack is the reference ("final") distribution that
the KL divergences and the final top-1 refer to; ranks are ``1 + #{v != t : l_v > l_t}``
(ties share the best rank); every statistic is computed and returned in float32.
"""

import platform
import time
from dataclasses import dataclass, replace
from typing import Optional

import torch

from lens_plugins.core.errors import LensValueError
from lens_plugins.core.reductions import READOUT, TABLE

NO_TARGET = -1  # a target id that means "nothing to score here" (e.g. the last position's next token)
# Shifted logits are clamped here before exp: below about -87.3, float32 exp is subnormal, which torch's
# vectorised exp computes some 70x slower (measured: 33 ms vs 0.46 ms per million). exp(-87) = 1.6e-38 is
# negligible in any sum it joins (a normaliser is >= 1), so the clamp changes no reported digit.
EXP_FLOOR = -87.0
# How the unembedding matmul is computed; every statistic is float32 whichever is chosen.
#   float32: exact float32 (the default).
#   tf32:    CUDA tensor cores with TF32 inputs (10-bit mantissa), float32 accumulation.
#   bf16x3:  each float32 operand split into bfloat16 hi + lo parts, hi*hi + hi*lo + lo*hi with float32
#            accumulation (about 16 mantissa bits; the lo*hi term vanishes when W_U is already bfloat16).
PRECISIONS = ("float32", "tf32", "bf16x3")
# Tile sizes when the caller gives none, by where W_U lives. A CPU wants M = rows x tokens per tile large
# enough that each W_U chunk is reused from cache by many vectors (a 1.2 MB chunk of SmolLM2's W_U by about
# 4,000 vectors runs the matmul at the machine's peak; 256 to 1,024 columns run at the same rate) and tiles of
# about ``CPU_TILE_ELEMENTS`` logits, so that the three tile-sized buffers the reductions read (logits,
# probabilities, products: 8 MB each) stay in a 32 MB last-level cache together, which on a shared machine other
# tenants also use (16 MB tiles measured 3-6% slower there, and no faster on a quiet one). Fewer vectors (a short
# prompt) get wider chunks, up to ``CPU_MAX_VOCAB_CHUNK``: every tile costs a few dozen small ops, and 512-column
# tiles of a 6-token prompt took 0.29-0.32 s where 1,024 columns took 0.19-0.21 s. Not wider: the same rows
# decoded in another geometry (a Patchscope's k copies, a one-prompt lens) then sum in much the same order, so
# their floats agree to well within 1e-4; 32,768- against 16,384-column sums differed by 1.2e-4 in a 109-nat KL.
# A GPU wants few, large tiles (every tile costs a few dozen kernel launches). A block's final-row logits are
# kept over the whole vocabulary (``_Tiles``): at most ``*_KEPT_LOGITS`` floats.
CPU_TILE_VECTORS, CPU_TILE_ELEMENTS, CPU_MAX_VOCAB_CHUNK, CPU_KEPT_LOGITS = 4096, 2**21, 1024, 2**23
GPU_TILE_ELEMENTS, GPU_VOCAB_CHUNK, GPU_KEPT_LOGITS = 2**27, 16384, 2**27
# Token blocks decoded at once on a CPU with several threads (``_map_blocks``). Two: each holds its own buffers
# (three tiles and its final-row logits, about 50 MB on SmolLM2), and two blocks' tiles already fill a 32 MB
# cache; more, on a machine with more cores, would need a measurement this project's two-core machines cannot make.
CPU_BLOCK_WORKERS = 2
MAX_VOCAB_CHUNK = 2**24  # a tile's rank counts are float32 sums of ones: exact up to here


def apply_final_norm(x, norm_kind, norm_weight, norm_bias, norm_eps):
    """The model's final norm on ``x [..., d_model]``, in float32.

    ``norm_kind`` is ``"rmsnorm"``, ``"layernorm"`` or ``"none"``. Families that scale by
    ``(1 + w)`` (Gemma) pass ``1 + w`` as ``norm_weight``; a folded norm passes ``None``.
    """
    x = x.float()
    if norm_kind == "rmsnorm":
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm_eps)
    elif norm_kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm_eps)
    elif norm_kind != "none":
        raise LensValueError(f"unknown norm_kind {norm_kind!r}: expected 'rmsnorm', 'layernorm' or 'none'")
    if norm_weight is not None:
        x = x * norm_weight.to(x.device, torch.float32)
    if norm_bias is not None:
        x = x + norm_bias.to(x.device, torch.float32)
    return x


def unembed(normed, W_U, b_U, softcap):
    """Float32 logits ``[..., vocab]`` of already-normed residuals (full vocabulary: use sparingly)."""
    logits = normed.float() @ W_U.float()
    if b_U is not None:
        logits = logits + b_U.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


@dataclass(frozen=True, eq=False)
class DecoderTensors:
    """The decoder as one value: ``logits = softcap(final_norm(h) @ W_U + b_U)``.

    Every reader of the vocabulary (this module's streamed readout, DoLa, the vocabulary loss, direct logit
    attribution) takes this one argument, so that a quirk of a family (a ``(1 + w)`` norm weight, OPT's
    folded ``project_out``, T5's output rescale folded into ``W_U``, Gemma's soft-cap) is settled once where the
    decoder is read (``architectures.decoder_tensors``, ``lens_plugins.Decoder``) and never again downstream.
    Plain (no type checks) because it is built inside remote traces; ``lens_plugins.Decoder`` is its checked
    public face. ``norm_weight`` is the multiplier the norm really applies; ``W_U`` is ``[d_model, vocab]``.
    """

    norm_kind: str
    W_U: torch.Tensor
    norm_weight: Optional[torch.Tensor] = None
    norm_bias: Optional[torch.Tensor] = None
    norm_eps: float = 1e-5
    b_U: Optional[torch.Tensor] = None
    softcap: Optional[float] = None

    @property
    def d_model(self):
        return self.W_U.shape[0]

    @property
    def d_vocab(self):
        return self.W_U.shape[1]

    def normalize(self, x):
        """The final norm of ``x [..., d_model]``, float32."""
        return apply_final_norm(x, self.norm_kind, self.norm_weight, self.norm_bias, self.norm_eps)

    def unembed(self, normed):
        """Float32 logits of already-normed residuals (full vocabulary)."""
        return unembed(normed, self.W_U, self.b_U, self.softcap)

    def without_norm(self):
        """The same unembedding behind no norm (DoLa's raw-residual mode, a lens that normalises itself)."""
        return replace(self, norm_kind="none", norm_weight=None, norm_bias=None)

    def detached(self, dtype=None):
        """Every tensor detached (and cast to ``dtype`` if given): a frozen decoder for training or caching."""
        def frozen(t):
            if t is None:
                return None
            t = t.detach()
            return t if dtype is None else t.to(dtype)
        return replace(self, W_U=frozen(self.W_U), norm_weight=frozen(self.norm_weight),
                       norm_bias=frozen(self.norm_bias), b_U=frozen(self.b_U))


def all_finite(tensor):
    """Whether every element of ``tensor`` is finite, at the cost of one sum: NaN and inf propagate through a
    sum, so a finite sum proves every term finite (an elementwise ``isfinite`` pass over a strided ``W_U`` view
    took 20x as long). Only a sum that overflows, or a tensor that does hold NaN / inf, pays for the
    elementwise pass that then decides."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def tile_sizes(device, rows, tokens, vocab):
    """``(vocab_chunk, token_chunk)`` for a stack of ``rows x tokens`` vectors decoded on ``device``: blocks of
    at most ``CPU_TILE_VECTORS`` vectors by a power-of-two chunk of about ``CPU_TILE_ELEMENTS`` logits (256 to
    ``CPU_MAX_VOCAB_CHUNK`` columns) on a CPU, ``GPU_TILE_ELEMENTS`` logits per tile on a GPU, with no more
    than ``*_KEPT_LOGITS`` final-row logits per block (a long prompt with few rows would otherwise keep
    ``tokens x vocab`` of them); token blocks of equal size, so that no small remainder tile costs a pass of
    its own."""
    cpu = device.type == "cpu"
    gpu_chunk = min(GPU_VOCAB_CHUNK, vocab)
    vectors, kept = (CPU_TILE_VECTORS, CPU_KEPT_LOGITS) if cpu else (GPU_TILE_ELEMENTS // gpu_chunk, GPU_KEPT_LOGITS)
    per_block = max(1, min(vectors // rows, kept // vocab))
    blocks = -(-tokens // per_block)
    token_chunk = -(-tokens // blocks)
    if not cpu:
        return gpu_chunk, token_chunk
    width = min(max(CPU_TILE_ELEMENTS // (rows * token_chunk), 256), CPU_MAX_VOCAB_CHUNK)
    return min(1 << (width.bit_length() - 1), vocab), token_chunk


def lens_statistics(
    resid,
    decoder,
    top_k,
    target_ids,
    vocab_chunk=None,
    token_chunk=None,
    reductions=None,
    precision="float32",
):
    """Decode every row of ``resid [rows, tokens, d_model]`` and reduce it on the fly.

    ``decoder`` is a ``DecoderTensors``; ``target_ids [tokens, T]`` holds token ids to score at each token
    (``NO_TARGET`` where there is none). Row 0 is the input row (the embeddings), the last row the
    reference ("final"). Returns float32 / int64 tensors, ``[rows, tokens]`` unless noted, for the
    requested ``reductions`` (default ``DEFAULT_REDUCTIONS``):

    - ``top_k``: ``top_ids``, ``top_logprobs`` ``[rows, tokens, top_k]``, best first
    - ``entropy``: in nats
    - ``kl_final_row``: KL(final || row); ``kl_row_final``: KL(row || final)
    - ``js_final``: Jensen-Shannon divergence to the final row (<= ln 2); ``tv_final``: total variation
      distance, half the L1 distance (<= 1). These two need the rows' normalisers first, so they cost a
      second pass over the vocabulary.
    - ``kl_input_row``: KL(input || row), the input row being row 0 decoded through the same lens
    - ``kl_next_row``: KL(row || next row); NaN at the last row
    - ``final_top1``: ``final_top1 [tokens]`` (the final row's argmax), ``final_top1_logprob``, ``final_top1_rank``
    - ``targets``: ``target_logprobs``, ``target_ranks`` ``[rows, tokens, T]``; NaN and -1 where there is none

    A tile is ``token_chunk`` tokens (with all their rows) by ``vocab_chunk`` vocabulary entries; ``None``
    picks sizes for the device ``W_U`` lives on (``tile_sizes``). Extra memory is a few tile-sized buffers,
    ``O(rows x token_chunk x vocab_chunk)``, independent of the vocabulary and of the number of tokens; the
    results do not depend on either chunk size beyond float rounding (ids and ranks not at all).
    ``precision`` (``PRECISIONS``) says how the unembedding matmul is computed.
    """
    reductions = DEFAULT_REDUCTIONS if reductions is None else reductions
    unknown = [name for name in reductions if name not in REDUCTIONS]
    if unknown:
        raise LensValueError(f"unknown reductions {unknown}; choose from {list(REDUCTIONS)}")
    W_U, b_U = decoder.W_U, decoder.b_U
    device = W_U.device  # work where the unembedding lives (on a multi-GPU server, the last layer's device)
    check_precision(precision, device)
    rows, tokens, _ = resid.shape
    auto_vocab, auto_tokens = tile_sizes(device, rows, tokens, W_U.shape[1])
    vocab_chunk = auto_vocab if vocab_chunk is None else vocab_chunk
    token_chunk = auto_tokens if token_chunk is None else token_chunk
    if vocab_chunk < 1 or token_chunk < 1:
        raise LensValueError(f"chunk sizes must be positive, got vocab_chunk={vocab_chunk}, token_chunk={token_chunk}")
    if vocab_chunk > MAX_VOCAB_CHUNK:
        raise LensValueError(f"vocab_chunk={vocab_chunk} exceeds {MAX_VOCAB_CHUNK}: a tile's rank counts are float32 "
                         f"sums of ones, exact only up to 2^24 columns; use a smaller vocab_chunk")
    want = set(reductions)
    resid = resid.to(device)
    target_ids = target_ids.to(device)
    if "targets" not in want:
        target_ids = target_ids[:, :0]
    if b_U is not None and not bool(b_U.any()):
        b_U = None  # TransformerLens gives every model a b_U, mostly zeros: adding them is a pass per tile for nothing
    unembedding = Unembedding(W_U, b_U, decoder.softcap, precision)
    k = min(top_k, W_U.shape[1])

    def block(n0, scratch, threads):
        n1 = min(n0 + token_chunk, tokens)
        normed = decoder.normalize(resid[:, n0:n1])
        return _lens_block(normed, unembedding, k, target_ids[n0:n1], vocab_chunk, want, scratch, threads)

    previous_tf32 = _allow_tf32(precision == "tf32")
    try:
        blocks = _map_blocks(block, list(range(0, tokens, token_chunk)), device)
    finally:
        _allow_tf32(previous_tf32)
    return {name: torch.cat([b[name] for b in blocks], dim=0 if name == "final_top1" else 1) for name in blocks[0]}


def _map_blocks(block, starts, device):
    """``[block(n0, scratch, threads) for n0 in starts]``: on a CPU with several threads and several token
    blocks, up to ``CPU_BLOCK_WORKERS`` blocks at a time, each in its own Python thread with its own buffers
    and an equal share of the caller's threads (one each, with two); otherwise one block after another with
    all of them.

    Why: a tile is a few dozen passes and each multi-threaded pass ends in an OpenMP barrier. When another
    process keeps one of two cores busy, every barrier waits for a descheduled thread; two blocks each on one
    thread share no barrier, so each runs whenever the scheduler gives it a core. The readout alone on SmolLM2 at
    256 tokens, an AVX2-only EPYC, two threads, one process, alternating: 6.56 s against 9.15 s with one block at
    a time and the per-tile thread choice while a spinning process holds one of the two cores, 4.44 s against
    4.84 s on a quiet machine (``bench_readout_old_new.py``; log ``benchmarks/results_2026-12-03_block_workers.log``,
    which also holds a first run with MKL tiles: 0.66x, 0.98x, and 0.91x at 1,024 tokens). A block's numbers do not depend on which thread
    computes it, nor on how many threads its passes use (``tests/test_readout.py``), so this changes speed, never
    a number. Blocks are handed out in order from a shared counter (no worker idles while another holds two), and
    each result lands in its own slot. Not on a GPU (one stream; the tiles are already large), and not while a
    torch mode (a fake-tensor or tracing mode) is active: modes are per thread, and a worker would not see it."""
    many = torch.get_num_threads() if device.type == "cpu" else 1
    workers = min(len(starts), many, CPU_BLOCK_WORKERS)
    if workers > 1 and (torch.utils._python_dispatch._get_current_dispatch_mode_stack()
                        or torch.overrides._get_current_function_mode_stack()):
        workers = 1
    results = [None] * len(starts)
    if workers == 1:
        # the tiles' matmuls, the final row's (a thirtieth of the work, in smaller matmuls), the reductions
        threads = tuple(_ThreadChoice(device) for _ in range(3))
        try:
            scratch = _Scratch(device)  # every buffer is allocated next to W_U, once for all blocks
            for i, n0 in enumerate(starts):
                results[i] = block(n0, scratch, threads)
        finally:
            for choice in threads:  # an error mid-tile must not leave the process at one thread
                choice.restore()
        return results
    import threading  # here, not at the top: only a CPU with several threads ever starts one

    lock, errors, pending = threading.Lock(), [], iter(range(len(starts)))
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()  # both are per thread

    def work():
        scratch, threads = _Scratch(device), tuple(_ThreadChoice(device, adapt=False) for _ in range(3))
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                while not errors:
                    with lock:
                        i = next(pending, None)
                    if i is None:
                        return
                    results[i] = block(starts[i], scratch, threads)
        except BaseException as error:  # re-raised in the caller's thread, which the others stop for
            errors.append(error)

    torch.set_num_threads(many // workers)
    try:
        others = [threading.Thread(target=work, daemon=True) for _ in range(workers - 1)]
        for thread in others:
            thread.start()
        work()  # the caller's thread is a worker too
        for thread in others:
            thread.join()
    finally:
        torch.set_num_threads(many)
    if errors:
        raise errors[0]
    return results


def check_precision(precision, device):
    """Refuse an unknown precision, and TF32 anywhere but CUDA (it is a tensor-core format)."""
    if precision not in PRECISIONS:
        raise LensValueError(f"unknown precision {precision!r}; choose from {list(PRECISIONS)}")
    if precision == "tf32" and device.type != "cuda":
        raise LensValueError(
            f"precision='tf32' needs W_U on a CUDA device (TF32 is an NVIDIA tensor-core format), but it is on "
            f"{device.type}: use precision='float32' (exact) or 'bf16x3' (split bfloat16, any device)"
        )


def _allow_tf32(allow):
    """Set whether CUDA float32 matmuls may use TF32; returns the previous setting, to restore."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    if allow != previous:
        matmul.allow_tf32 = allow
    return previous


def _split_bf16(x):
    """``x`` as bfloat16 ``(hi, lo)`` with ``hi + lo`` about 16 mantissa bits of ``x``; ``lo`` is ``None`` when
    ``x`` is already bfloat16 (nothing left over)."""
    if x.dtype == torch.bfloat16:
        return x, None
    x = x.float()
    hi = x.bfloat16()
    return hi, (x - hi.float()).bfloat16()


def _bf16_matmul(a, b):
    """``a @ b`` of bfloat16 operands with float32 output and accumulation: a CUDA tensor-core matmul where
    torch offers one (``out_dtype``), elsewhere the same numbers by a float32 matmul (a product of two
    bfloat16 values is exact in float32)."""
    if a.device.type == "cuda":
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return a.float() @ b.float()


def onednn_matmul(device):
    """Whether exact float32 tiles on ``device`` go through oneDNN's matmul rather than ``torch.matmul`` (MKL):
    on an x86 CPU with a oneDNN build. For the lens's tiles of a ``W_U`` held as ``lm_head.weight`` rows, oneDNN
    took 0.83x-0.94x of MKL's time on this project's AVX-512 machines (AMD EPYC; three runs on a shared host).
    On one thread of an AVX2-only EPYC MKL was the faster (oneDNN 1.07x-1.08x its time, 0.98x on two threads;
    ``benchmarks/bench_matmul.py``, which also checks both against float64), but MKL's product of a few rows
    (7 of them, as a short prompt's final row gives) differs in the last bits between one thread and two, where
    oneDNN's does not: the readout picks its threads per tile by timing (``_ThreadChoice``) and per block
    (``_map_blocks``), so with MKL the same call could return different floats from run to run. Both accumulate
    in float32: the choice moves logits by float32 rounding only."""
    return (device.type == "cpu" and platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class Unembedding:
    """``W_U`` (+ ``b_U``, soft-cap) at a precision, producing float32 logit tiles: ``chunk(v0, v1)`` prepares
    a vocabulary chunk once, ``logits(normed, chunk, out)`` writes the logits of ``normed [M, d]`` into
    ``out [M, chunk width]``."""

    def __init__(self, W_U, b_U, softcap, precision):
        self.W_U, self.b_U, self.softcap, self.precision = W_U, b_U, softcap, precision
        self.onednn = precision == "float32" and onednn_matmul(W_U.device)

    def chunk(self, v0, v1):
        W = self.W_U[:, v0:v1]
        b = None if self.b_U is None else self.b_U[v0:v1].float()
        if self.precision == "bf16x3":
            hi, lo = _split_bf16(W)
            if W.device.type != "cuda":  # the float32 emulation: convert once per chunk, not once per matmul
                hi, lo = hi.float(), None if lo is None else lo.float()
            return hi, lo, b
        if self.onednn:  # as [out, in] rows: a strided view (a [d_model, vocab] W_U's chunk) took 1,400x longer
            return W.T.contiguous().float(), None, b
        return W.float(), None, b

    def operand(self, normed):
        """``normed`` as the matmul wants it: float32, or its bfloat16 split."""
        if self.precision != "bf16x3":
            return normed.contiguous() if self.onednn else normed
        hi, lo = _split_bf16(normed)
        if normed.device.type != "cuda":
            hi, lo = hi.float(), lo.float()
        return hi, lo

    def logits(self, a, chunk, out):
        W, W_lo, b = chunk
        if self.onednn:
            out.copy_(torch.ops.mkldnn._linear_pointwise(a, W, None, "none", [], ""))
        elif self.precision != "bf16x3":
            torch.matmul(a, W, out=out)
        else:  # small terms first, then the large one
            hi, lo = a
            out.copy_(_bf16_matmul(lo, W))
            if W_lo is not None:
                out += _bf16_matmul(hi, W_lo)
            out += _bf16_matmul(hi, W)
        if b is not None:
            out += b
        if self.softcap is not None:
            torch.tanh(out.div_(self.softcap), out=out).mul_(self.softcap)
        return out


def _target_logits(normed, W_U, b_U, softcap, ids):
    """Logit of ``ids [tokens, T]`` at every row of ``normed [rows, tokens, d]``: d_model dot products,
    no vocabulary pass. Invalid ids (``NO_TARGET``) get ``+inf`` so that nothing counts above them."""
    valid = ids >= 0
    safe = ids.clamp(min=0)
    columns = W_U.T[safe].float()  # [tokens, T, d]
    logits = torch.einsum("rnd,ntd->rnt", normed, columns)
    if b_U is not None:
        logits = logits + b_U.float()[safe]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.where(valid, logits, torch.full_like(logits, float("inf")))


class _Scratch:
    """Named flat float32 buffers on one device, handed out as contiguous views of any shape and kept from
    tile to tile (the last vocabulary chunk is narrower) and block to block, so that no tile allocates: a
    fresh multi-megabyte tensor costs page faults."""

    def __init__(self, device):
        self.device, self.storage = device, {}

    def flat(self, name, numel):
        storage = self.storage.get(name)
        if storage is None or storage.numel() < numel:
            storage = self.storage[name] = torch.empty(numel, device=self.device)
        return storage[:numel]

    def view(self, name, *shape):
        numel = 1
        for dim in shape:
            numel *= dim
        return self.flat(name, numel).view(shape)


class _Tiles:
    """The logits of one token block, ``[rows, n, chunk width]``, tile by tile, each from one matmul over all
    ``rows x n`` vectors. With ``final_first`` the final row's logits over the whole vocabulary are computed
    before the pass (every row's count of logits above the final top-1 needs that top-1 from the start) and
    kept, ``[n, vocab]``: each tile copies its chunk of them instead of computing it again, so the final top-1
    is bitwise the argmax of the final row the pass reads."""

    def __init__(self, normed, unembedding, vocab_chunk, final_first, scratch, threads):
        self.rows, self.n, d = normed.shape
        self.scratch = scratch
        self.threads, final_threads = threads  # ``_ThreadChoice``s: the tiles' matmuls, the final row's smaller ones
        self.unembedding, self.vocab_chunk, self.vocab = unembedding, vocab_chunk, unembedding.W_U.shape[1]
        self.width = min(vocab_chunk, self.vocab)
        self.all = unembedding.operand(normed[:-1].reshape(-1, d) if final_first else normed.reshape(-1, d))
        self.final = None
        if final_first:
            self.final = scratch.flat("final", self.n * self.vocab)
            final = unembedding.operand(normed[-1])
            for v0, w, chunk in self.chunks():
                out = self._final_chunk(v0, w)
                final_threads.begin()
                unembedding.logits(final, chunk, out)
                final_threads.end(out.numel())

    def _final_chunk(self, v0, w):
        """The kept final-row logits of columns ``v0 : v0 + w``, contiguous ``[n, w]``."""
        return self.final[self.n * v0: self.n * (v0 + w)].view(self.n, w)

    def chunks(self):
        for v0 in range(0, self.vocab, self.vocab_chunk):
            v1 = min(v0 + self.vocab_chunk, self.vocab)
            yield v0, v1 - v0, self.unembedding.chunk(v0, v1)

    def __iter__(self):
        """``(v0, tile)`` for every vocabulary chunk; ``tile`` is a view of one reused buffer."""
        for v0, w, chunk in self.chunks():
            tile = self.scratch.view("tile", self.rows, self.n, w)
            self.threads.begin()  # the tile's matmul and the copy of its final row, with the faster thread count
            if self.final is None:
                self.unembedding.logits(self.all, chunk, tile.view(-1, w))
            else:
                self.unembedding.logits(self.all, chunk, tile[:-1].view(-1, w))
                tile[-1].copy_(self._final_chunk(v0, w))
            self.threads.end(tile.numel())
            yield v0, tile

    def final_argmax(self):
        """The final row's argmax ``[n]`` over the whole vocabulary, from the kept final-row logits."""
        best = torch.full((self.n,), float("-inf"), device=self.scratch.device)
        best_id = torch.zeros(self.n, dtype=torch.long, device=self.scratch.device)
        for v0 in range(0, self.vocab, self.vocab_chunk):
            value, index = self._final_chunk(v0, min(self.vocab_chunk, self.vocab - v0)).max(-1)
            better = value > best
            best = torch.where(better, value, best)
            best_id = torch.where(better, index + v0, best_id)
        return best_id


# Every reduction the readout can compute, each opt-in by name (a remote trace computes and downloads
# only what was asked for), and the result fields each fills: ``lens_plugins.core.reductions.TABLE``.
# ``log_partition`` (logsumexp of each row's logits) always comes back: every log-prob is a logit minus it.
REDUCTIONS = READOUT
DEFAULT_REDUCTIONS = tuple(name for name in READOUT if TABLE[name]["default"]) + ("targets",)
# Row selections of a ``[rows, n, width]`` tile; a one-row slice keeps its dim, to broadcast against all rows.
_ALL, _BUT_LAST, _FROM_SECOND = slice(None), slice(None, -1), slice(1, None)
_FIRST, _LAST = slice(0, 1), slice(-1, None)


def _expectations(want):
    """The sums ``sum_v p_a(v) l_b(v)`` the requested reductions need, ``name -> (a rows, b rows)``: the
    expectation under row ``a``'s distribution of row ``b``'s logits. Its own logits give the entropy; the
    final row's, KL(row || final); the next row's, KL(row || next); every row's logits under the final
    (input) row's distribution give KL(final (input) || row)."""
    terms = {}
    if want & {"entropy", "kl_row_final", "kl_next_row"}:
        terms["own"] = (_ALL, _ALL)
    if "kl_row_final" in want:
        terms["final"] = (_BUT_LAST, _LAST)
    if "kl_next_row" in want:
        terms["next"] = (_BUT_LAST, _FROM_SECOND)
    if "kl_final_row" in want:
        terms["under_final"] = (_LAST, _ALL)
    if "kl_input_row" in want:
        terms["under_input"] = (_FIRST, _ALL)
    return terms


def _lens_block(normed, unembedding, k, target_ids, vocab_chunk, want, scratch, threads):
    """All requested reductions for one block of tokens ``normed [rows, n, d_model]`` (already through the
    final norm): one pass over the vocabulary, after the final row's logits when the final top-1's ranks are
    wanted (every row's count needs its threshold from the start), and before the second pass that
    Jensen-Shannon and total variation need.

    Each tile gives ``p``, its own distribution up to a factor: ``exp(l - tile max)``, or where the fused softmax
    kernel is faster (``_fused_softmax_faster``) the softmax, whose normaliser is ``1 / max p`` (the max's own
    term is ``exp(0) = 1``). The running sums are kept relative to a running max, as an online softmax does: a
    tile enters them weighted by that factor times ``exp(tile max - running max)``, so each expectation is one
    dot product of ``p`` with a row of logits per tile. The reference rows (final, input) are rows of the same tiles, so a row
    compared with itself gives divergences of exactly zero.

    Accuracy: an expectation ``E_p[l]`` is near the log-partition (25 to 180 nats on SmolLM2) while the entropy
    and KLs are differences of such sums, so each relative error in a sum is multiplied by ``|lse|`` in the
    result. Hence the normaliser ``s`` sums the ``p`` as rounded (a softmax's ``sum p`` is 1 only to ~6e-7), and
    every sum across tiles is compensated (``_RunningSum``): on SmolLM2 the readout's own entropy error fell
    from 6.9e-5 to 2.4e-5 nats (the latter where ``lse`` is 158, 1.5 float32 ulps) and KL(final || row)'s
    relative error from 2.3e-5 to 8e-6 (``tests/test_readout_float64.py``).
    """
    rows, n, _ = normed.shape
    tiles = _Tiles(normed, unembedding, vocab_chunk, "final_top1" in want, scratch, threads[:2])
    device = normed.device
    columns = [target_ids.long()]
    final_top1 = None
    if "final_top1" in want:
        final_top1 = tiles.final_argmax()
        columns.insert(0, final_top1.unsqueeze(-1))
    ids = torch.cat(columns, dim=-1)  # [n, targets to rank]
    thresholds = _target_logits(normed, unembedding.W_U, unembedding.b_U, unembedding.softcap, ids)
    own_columns = _columns_by_chunk(ids, vocab_chunk)

    terms = _expectations(want)
    sums = {name: _RunningSum() for name in terms}  # sum_v e_a(v) l_b(v), e relative to the running max
    m = torch.full((rows, n), float("-inf"), device=device)
    s = _RunningSum()  # sum_v e(v)
    counts = torch.zeros(rows, n, ids.shape[1], dtype=torch.int32, device=device)  # exact below 2^31
    top_vals = torch.full((rows * n, k), float("-inf"), device=device)
    top_ids = torch.zeros(rows * n, k, dtype=torch.long, device=device)

    reduce = threads[2]
    fused_softmax = _fused_softmax_faster(device)
    for v0, tile in tiles:
        reduce.begin()
        group = _group_size(tile.shape[-1])
        group_max = tile.view(rows * n, -1, group).amax(-1) if group else None  # [vectors, groups]
        tile_max = tile.amax(-1) if group is None else group_max.amax(-1).view(rows, n)
        _count_above(tile, tile_max, thresholds, own_columns.get(v0), counts, scratch.view("product", *tile.shape))
        if "top_k" in want:
            _merge_top_k(tile.view(rows * n, -1), tile_max.view(-1), group_max, v0, top_vals, top_ids)
        m_new = torch.maximum(m, tile_max)
        kept = torch.exp(m - m_new)  # rescales what was summed so far to the new max
        weight = torch.exp(tile_max - m_new)  # the tile's max relative to m_new
        if fused_softmax:
            p = torch.softmax(tile, -1, out=scratch.view("p", *tile.shape))
            weight = weight / p.amax(-1)  # softmax's normaliser 1 / max p
        else:  # p = exp(l - tile max): its max is exactly 1, no normaliser to recover
            p = torch.sub(tile, tile_max.unsqueeze(-1), out=scratch.view("p", *tile.shape)).exp_()
        s.add(kept, weight * p.sum(-1))  # the p as rounded: their sum is what the dot products weigh
        for name, (a, b) in terms.items():  # one side may be a single row (broadcast); the shape by hand:
            pa, lb = p[a], tile[b]            # ``torch.broadcast_shapes`` is Python, 12-30 us a call
            dot = torch.mul(pa, lb, out=scratch.view("product", max(len(pa), len(lb)), n, tile.shape[-1]))
            sums[name].add(kept[a], weight[a] * dot.sum(-1))
        m = m_new
        reduce.end(tile.numel())

    s = s.value()
    sums = {name: total.value() for name, total in sums.items()}
    lse = m + torch.log(s)
    out = {"log_partition": lse}
    if "top_k" in want:
        out["top_ids"] = top_ids.view(rows, n, k)
        out["top_logprobs"] = top_vals.view(rows, n, k) - lse.unsqueeze(-1)
    expected = {name: total / s[terms[name][0]] for name, total in sums.items()}  # E_{p_a}[l_b]
    if "entropy" in want:
        out["entropy"] = lse - expected["own"]
    if "kl_row_final" in want:  # the final row's own cross term is its own sum: exactly zero against itself
        cross = torch.cat([expected["final"], expected["own"][-1:]])
        out["kl_row_final"] = (expected["own"] - cross) - lse + lse[-1]
    if "kl_next_row" in want:
        kl_next = (expected["own"][:-1] - expected["next"]) - lse[:-1] + lse[1:]
        out["kl_next_row"] = torch.cat([kl_next, torch.full((1, n), float("nan"), device=device)])
    for name, key, source in (("under_final", "kl_final_row", -1), ("under_input", "kl_input_row", 0)):
        if name in expected:  # KL(ref || row) = (E_ref[l_ref] - lse_ref) - (E_ref[l_row] - lse_row)
            out[key] = (expected[name][source] - lse[source]) - (expected[name] - lse)
    if want & {"js_final", "tv_final"}:
        out.update(_divergence_pass(tiles, lse, want))

    logprobs = thresholds - lse.unsqueeze(-1)
    ranks = counts.long() + 1
    valid = (ids >= 0).unsqueeze(0).expand_as(ranks)
    logprobs = torch.where(valid, logprobs, torch.full_like(logprobs, float("nan")))
    ranks = torch.where(valid, ranks, torch.full_like(ranks, -1))
    first = 0
    if "final_top1" in want:
        out.update(final_top1=final_top1, final_top1_logprob=logprobs[..., 0], final_top1_rank=ranks[..., 0])
        first = 1
    if "targets" in want:
        out.update(target_logprobs=logprobs[..., first:], target_ranks=ranks[..., first:])
    return out


def _fused_softmax_faster(device):
    """Whether a tile's ``p`` comes from ``torch.softmax`` rather than ``exp(l - tile max)``. ATen's CPU softmax
    has its own faster exponential only where it is built for AVX-512; elsewhere the separate subtraction and
    ``exp`` are faster: per SmolLM2 tile (31 x 128 x 512) on one thread, 1.3 ms against 2.1 ms with AVX-512,
    2.8 ms against 2.0 ms with AVX2 only and 11.3 ms against 2.2 ms without vector extensions
    (``ATEN_CPU_CAPABILITY``, as ``benchmarks/bench_cpu_robustness.py`` emulates the other CPUs). On a GPU the
    fused kernel is one pass instead of two."""
    return device.type != "cpu" or torch.backends.cpu.get_cpu_capability().startswith("AVX512")


class _ThreadChoice:
    """How many threads a kind of per-tile work (the tile's matmul, the final row's smaller matmuls, or the
    few dozen elementwise reductions after the matmul) runs with on a CPU: the caller's
    ``torch.get_num_threads()`` or one, whichever this call measures faster per element.

    Every pass ends in an OpenMP barrier. When every thread has a core that is cheap; when another process
    keeps one of two cores busy, each barrier waits for a descheduled thread: on SmolLM2 at 256 tokens, with
    another process on one of two cores, a tile's reductions took 75-115 ms with two threads against 16 ms with
    one, and the lens 1.4x the floor where one thread gave 0.7x; the matmul, one large kernel, suffered less
    (5.3 s against 4.7 s). Both settings are tried on the first tiles and the faster is used from then on (a
    moving average of seconds per element); the other is tried again after ``RETRY`` tiles, then after twice
    as many each time it is still slower, so that a change in load is noticed at little cost. Every reduction
    and the matmul give bitwise the same result with any number of threads (``tests/test_readout.py`` holds
    it), so the choice changes speed, never a number. A GPU, a caller with one thread, or a worker of
    ``_map_blocks`` (``adapt=False``: the workers share the process's thread count) is left alone."""

    RETRY = 8

    def __init__(self, device, adapt=True):
        self.many = torch.get_num_threads() if device.type == "cpu" and adapt else 1
        self.cost = {}
        self.tiles, self.interval, self.next_retry = 0, self.RETRY, self.RETRY
        self.current, self.retrying, self.start = None, False, 0.0

    def begin(self):
        if self.many == 1:
            return
        options = (self.many, 1)
        untried = [t for t in options if t not in self.cost]
        self.tiles += 1
        self.retrying = not untried and self.tiles >= self.next_retry
        if untried:
            choice = untried[0]
        else:
            best = min(options, key=lambda t: self.cost[t])
            choice = (options[1] if best == options[0] else options[0]) if self.retrying else best
        self.current = choice
        torch.set_num_threads(choice)
        self.start = time.perf_counter()

    def end(self, elements):
        if self.current is None:
            return
        per_element = (time.perf_counter() - self.start) / max(elements, 1)
        torch.set_num_threads(self.many)  # whatever runs next runs with the caller's threads
        old = self.cost.get(self.current)
        if self.retrying:  # what this setting costs under the load of now, not of the first tiles
            self.cost[self.current] = per_element
            other = self.cost[self.many if self.current == 1 else 1]
            self.interval = self.interval * 2 if per_element > other else self.RETRY
            self.next_retry = self.tiles + self.interval
        else:
            self.cost[self.current] = per_element if old is None else 0.5 * (old + per_element)
        self.current = None

    def restore(self):
        if self.current is not None:
            torch.set_num_threads(self.many)
            self.current = None


class _RunningSum:
    """A float32 sum of ``[rows, n]`` terms across tiles, rescaled by ``kept`` whenever the running max moves,
    that carries the rounding error of every addition along (Knuth's TwoSum: ``a + b = total + error``
    exactly, on any device, in five elementwise ops on ``rows x n`` values: nothing next to a tile's passes).
    A plain sum over the 48 tiles of a 49k vocabulary gave up several ulps of each expectation."""

    def __init__(self):
        self.total, self.error = None, None

    def add(self, kept, term):
        if self.total is None:
            self.total, self.error = term, torch.zeros_like(term)
            return
        a = self.total * kept
        total = a + term
        b = total - a
        self.error = self.error * kept + ((a - (total - b)) + (term - b))
        self.total = total

    def value(self):
        return self.total + self.error


def _divergence_pass(tiles, lse, want):
    """Jensen-Shannon divergence and total variation to the final row. Both need each row's normalised
    probabilities, hence the normalisers from the first pass and a second matmul per tile.
    JS = sum [p log p + q log q] / 2 - sum m log m with m = (p + q) / 2, so a row equal to the final row
    (m == p bitwise) gives exactly 0."""
    rows, n = lse.shape
    js_terms = torch.zeros_like(lse)
    tv = torch.zeros_like(lse)
    for _, tile in tiles:
        p = torch.exp(torch.sub(tile, lse.unsqueeze(-1), out=tile).clamp_(min=EXP_FLOOR), out=tile)
        q = p[-1]
        if "js_final" in want:
            mix = (p + q) * 0.5
            q_log_q = torch.xlogy(q, q)
            js_terms += ((torch.xlogy(p, p) + q_log_q) * 0.5 - torch.xlogy(mix, mix)).sum(-1)
        if "tv_final" in want:
            tv += (p - q).abs().sum(-1)
    out = {}
    if "js_final" in want:
        out["js_final"] = js_terms
    if "tv_final" in want:
        out["tv_final"] = tv * 0.5
    return out


def _group_size(width):
    """Width of the groups a tile's rows are cut into for the top-k (a power of two from 8 to 64 that divides
    ``width``), or ``None`` when none does: then the top-k reads whole rows."""
    for group in (64, 32, 16, 8):
        if width % group == 0 and width >= 4 * group:
            return group
    return None


def _merge_top_k(tile, tile_max, group_max, v0, top_vals, top_ids):
    """Merge a tile ``[vectors, width]`` into a running top-k, touching only the vectors whose tile max
    beats their k-th best. With ``group_max [vectors, groups]`` (the max of each group of consecutive
    columns) only the k groups with the largest maxima are read: they hold the k largest values (any other
    group's max has k larger values above it), so the top-k costs a small gather instead of a pass."""
    k = top_vals.shape[-1]
    beat = tile_max > top_vals[:, -1]
    rows = None if bool(beat.all()) else torch.nonzero(beat).squeeze(-1)
    if rows is not None and rows.numel() == 0:
        return
    n_groups = 0 if group_max is None else group_max.shape[-1]
    if n_groups > k:
        width = tile.shape[-1] // n_groups
        maxima = group_max if rows is None else group_max.index_select(0, rows)
        groups = maxima.topk(k, dim=-1).indices  # [chosen, k]
        vectors = torch.arange(tile.shape[0], device=tile.device) if rows is None else rows
        columns = (groups.unsqueeze(-1) * width + torch.arange(width, device=tile.device)).flatten(1)  # [chosen, k*w]
        candidates = tile.view(-1)[(vectors.unsqueeze(-1) * tile.shape[-1] + columns)]
        vals, where = candidates.topk(k, dim=-1)
        idx = columns.gather(-1, where)
    else:
        candidates = tile if rows is None else tile.index_select(0, rows)
        vals, idx = candidates.topk(min(k, tile.shape[-1]), dim=-1)
    if rows is None:
        merged_vals, merged_ids = torch.cat([top_vals, vals], dim=-1), torch.cat([top_ids, idx + v0], dim=-1)
        best_vals, order = merged_vals.topk(k, dim=-1)
        top_vals.copy_(best_vals)
        top_ids.copy_(merged_ids.gather(-1, order))
        return
    merged_vals = torch.cat([top_vals.index_select(0, rows), vals], dim=-1)
    merged_ids = torch.cat([top_ids.index_select(0, rows), idx + v0], dim=-1)
    best_vals, order = merged_vals.topk(k, dim=-1)
    top_vals[rows] = best_vals
    top_ids[rows] = merged_ids.gather(-1, order)


def _columns_by_chunk(ids, vocab_chunk):
    """Where each id to rank lies, by vocabulary chunk: ``{v0: (tokens, targets, columns in the chunk)}``,
    so that a tile finds the targets it holds without a search."""
    chunk = torch.where(ids >= 0, ids // vocab_chunk, -1)
    where = {}
    for c in chunk.unique().tolist():
        if c >= 0:
            token, target = torch.nonzero(chunk == c, as_tuple=True)
            where[c * vocab_chunk] = (token, target, ids[token, target] - c * vocab_chunk)
    return where


def _count_above(tile, tile_max, thresholds, own, counts, above):
    """Add, per row, token and target, how many tile logits lie strictly above the target's logit
    (``thresholds [rows, n, targets]``), not counting the target itself (``own``: the targets this tile
    holds, from ``_columns_by_chunk``): its tile logit may round a hair above its dot-product logit.
    ``above`` is a float buffer of the tile's shape: comparing into floats and summing them is faster than
    summing booleans, and exact (a tile holds fewer than 2^24 columns)."""
    for j in range(thresholds.shape[-1]):
        threshold = thresholds[..., j]
        rows = torch.nonzero((tile_max > threshold).any(-1)).squeeze(-1).tolist()  # rows with anything above
        if rows:  # a late row's target is often at the top, with nothing above it in most tiles
            r0, r1 = rows[0], rows[-1] + 1
            above_here = above[r0:r1]
            counts[r0:r1, :, j] += torch.gt(tile[r0:r1], threshold[r0:r1].unsqueeze(-1), out=above_here).sum(-1).int()
    if own is not None:
        token, target, column = own
        counts[:, token, target] -= (tile[:, token, column] > thresholds[:, token, target]).int()

__all__ = ["DecoderTensors", "all_finite", "NO_TARGET", "EXP_FLOOR", "PRECISIONS", "MAX_VOCAB_CHUNK", "apply_final_norm", "unembed", "tile_sizes",
    "lens_statistics", "check_precision", "onednn_matmul", "Unembedding", "REDUCTIONS", "DEFAULT_REDUCTIONS"]
