"""The streamed readout against closed forms computed on the full distribution."""

import math
import platform

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lens_plugins.core import readout
from lens_plugins.decoder import Decoder


def full_reference(resid, decoder, top_k, targets):
    """Every statistic from the materialised [row, token, vocab] log-probs: the slow, obvious way."""
    logp = decoder.logits(resid).log_softmax(-1).double()
    p = logp.exp()
    final = logp[-1]
    final_top1 = final.argmax(-1)

    def rank_and_logprob(ids):  # ids [token, T]; rank counts strictly larger logits
        own = logp.gather(-1, ids.clamp(min=0).unsqueeze(0).expand(logp.shape[0], -1, -1))
        ranks = (logp.unsqueeze(-2) > own.unsqueeze(-1)).sum(-1) + 1
        return ranks, own

    top = logp.topk(top_k, dim=-1)
    return {
        "entropy": -(p * logp).sum(-1),
        "kl_final_row": (final.exp() * (final - logp)).sum(-1),
        "kl_row_final": (p * (logp - final)).sum(-1),
        "top_ids": top.indices,
        "top_logprobs": top.values,
        "final_top1": final_top1,
        "final_top1": final_top1,
        "final_top1_rank_logprob": rank_and_logprob(final_top1.unsqueeze(-1)),
        "target_rank_logprob": rank_and_logprob(targets),
    }


def random_case(rows=4, tokens=9, d=12, vocab=300, norm="layernorm", softcap=None, bias=True, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    resid = torch.randn(rows, tokens, d, generator=g) * 3
    decoder = Decoder(
        norm_kind=norm,
        W_U=torch.randn(d, vocab, generator=g) * scale,
        norm_weight=torch.rand(d, generator=g) + 0.5,
        norm_bias=torch.randn(d, generator=g) * 0.1 if norm == "layernorm" else None,
        norm_eps=1e-5,
        b_U=torch.randn(vocab, generator=g) if bias else None,
        softcap=softcap,
    )
    targets = torch.randint(0, vocab, (tokens, 2), generator=g)
    targets[-1, 0] = readout.NO_TARGET
    return resid, decoder, targets


def check_against_reference(out, ref, atol=2e-5):
    for name in ("entropy", "kl_final_row", "kl_row_final", "top_logprobs"):
        torch.testing.assert_close(out[name].double(), ref[name], atol=atol, rtol=1e-5, msg=name)
    assert torch.equal(out["top_ids"], ref["top_ids"])
    assert torch.equal(out["final_top1"], ref["final_top1"])
    ranks, logprobs = ref["final_top1_rank_logprob"]
    assert torch.equal(out["final_top1_rank"], ranks[..., 0])
    torch.testing.assert_close(out["final_top1_logprob"].double(), logprobs[..., 0], atol=atol, rtol=1e-5)
    ranks, logprobs = ref["target_rank_logprob"]
    valid = torch.ones_like(ranks, dtype=torch.bool)
    valid[:, -1, 0] = False
    assert torch.equal(out["target_ranks"][valid], ranks[valid])
    torch.testing.assert_close(out["target_logprobs"][valid].double(), logprobs[valid], atol=atol, rtol=1e-5)
    assert (out["target_ranks"][:, -1, 0] == -1).all() and out["target_logprobs"][:, -1, 0].isnan().all()


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "none"])
@pytest.mark.parametrize("softcap", [None, 7.0])
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "torch_matmul"])
@pytest.mark.parametrize("fused", [True, False], ids=["softmax", "exp"])
def test_streamed_statistics_equal_full_vocabulary_closed_forms(norm, softcap, onednn, fused, monkeypatch):
    """Through either matmul a CPU may use: oneDNN (the default on x86) and ``torch.matmul`` (elsewhere), and
    either way of computing a tile's probabilities: the softmax (AVX-512 CPUs, GPUs) and ``exp(l - tile max)``
    (other CPUs, ``readout._fused_softmax_faster``), whichever this machine would pick."""
    if onednn and not readout.onednn_matmul(torch.device("cpu")):
        pytest.skip("no oneDNN matmul on this machine")
    monkeypatch.setattr(readout, "onednn_matmul", lambda device: onednn)
    monkeypatch.setattr(readout, "_fused_softmax_faster", lambda device: fused)
    resid, decoder, targets = random_case(norm=norm, softcap=softcap)
    assert readout.Unembedding(decoder.W_U, None, None, "float32").onednn == onednn
    out = decoder.statistics(resid, targets, top_k=4, vocab_chunk=64, token_chunk=4)
    check_against_reference(out, full_reference(resid, decoder, 4, targets))


@pytest.mark.parametrize("vocab_chunk,token_chunk", [(1, 1), (7, 2), (64, 3), (299, 9), (300, 100), (4096, 256)])
def test_result_does_not_depend_on_chunk_sizes(vocab_chunk, token_chunk):
    resid, decoder, targets = random_case(seed=3)
    unchunked = decoder.statistics(resid, targets, top_k=5, vocab_chunk=300, token_chunk=9)
    chunked = decoder.statistics(resid, targets, top_k=5, vocab_chunk=vocab_chunk, token_chunk=token_chunk)
    for name, value in unchunked.items():
        if value.is_floating_point():
            torch.testing.assert_close(chunked[name], value, atol=5e-5, rtol=1e-5, equal_nan=True, msg=name)
        else:
            assert torch.equal(chunked[name], value), name


@pytest.mark.parametrize("fused", [True, False], ids=["softmax", "exp"])
def test_final_row_against_itself_is_exactly_zero_and_rank_one(fused, monkeypatch):
    monkeypatch.setattr(readout, "_fused_softmax_faster", lambda device: fused)
    resid, decoder, targets = random_case(seed=5)
    out = decoder.statistics(resid, targets, top_k=3, vocab_chunk=37, token_chunk=4)
    assert torch.equal(out["kl_final_row"][-1], torch.zeros(resid.shape[1]))
    assert torch.equal(out["kl_row_final"][-1], torch.zeros(resid.shape[1]))
    assert (out["final_top1_rank"][-1] == 1).all()
    assert torch.equal(out["top_ids"][-1, :, 0], out["final_top1"])


def test_entropy_and_kl_of_hand_made_distributions():
    """Logits chosen so that the distributions are known exactly: uniform over 4 of 8 tokens vs one-hot-ish."""
    big = 60.0  # exp(-60) underflows against 1 in float32: these tokens have probability 0
    # Identity decoder: W_U = I, no norm, so logits == residual.
    decoder = Decoder(norm_kind="none", W_U=torch.eye(8))
    uniform4 = torch.tensor([0, 0, 0, 0, -big, -big, -big, -big])
    uniform8 = torch.zeros(8)
    two_point = torch.tensor([math.log(3.0), 0, -big, -big, -big, -big, -big, -big])  # p = (3/4, 1/4)
    resid = torch.stack([uniform4, two_point, uniform8]).unsqueeze(1)  # rows: uniform4, two-point, final=uniform8
    out = decoder.statistics(resid, torch.tensor([[0]]), top_k=2, vocab_chunk=3, token_chunk=1)
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(out["entropy"][:, 0], torch.tensor([math.log(4), h2, math.log(8)]))
    # KL(uniform8 || uniform4) is infinite in exact arithmetic; here p=0 becomes exp(-60): KL ~ 0.5*60 + ...
    # KL(uniform4 || uniform8) = log 8 - log 4 = log 2 exactly.
    torch.testing.assert_close(out["kl_row_final"][0, 0], torch.tensor(math.log(2.0)))
    # KL(two-point || uniform8) = sum p log(8p)
    expected = 0.75 * math.log(8 * 0.75) + 0.25 * math.log(8 * 0.25)
    torch.testing.assert_close(out["kl_row_final"][1, 0], torch.tensor(expected))
    torch.testing.assert_close(out["top_logprobs"][1, 0], torch.tensor([math.log(0.75), math.log(0.25)]))


def test_ties_share_the_best_rank():
    decoder = Decoder(norm_kind="none", W_U=torch.eye(6))
    logits = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.0])
    resid = torch.stack([logits, logits]).unsqueeze(1)
    out = decoder.statistics(resid, torch.tensor([[2, 3, 5]]), top_k=1, vocab_chunk=4, token_chunk=1)
    assert out["target_ranks"][0, 0].tolist() == [1, 4, 6]


def test_half_precision_inputs_are_reduced_in_float32():
    resid, decoder, targets = random_case(seed=7)
    half = Decoder(norm_kind=decoder.norm_kind, W_U=decoder.W_U.half(), norm_weight=decoder.norm_weight.half(),
                   norm_bias=decoder.norm_bias.half(), b_U=decoder.b_U.half())
    out = half.statistics(resid.half(), targets, top_k=3, vocab_chunk=50, token_chunk=4)
    assert all(v.dtype in (torch.float32, torch.int64) for v in out.values())
    assert torch.isfinite(out["entropy"]).all() and torch.isfinite(out["kl_final_row"]).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), vocab_chunk=st.integers(1, 40), scale=st.floats(0.01, 20.0))
@example(seed=175, vocab_chunk=1, scale=17.875)  # entropy -1.5e-5 (one ulp of its 128-256 nat lse) without SIMD
def test_divergences_are_nonnegative_and_entropy_bounded(seed, vocab_chunk, scale):
    resid, decoder, targets = random_case(rows=3, tokens=3, d=6, vocab=40, seed=seed, scale=scale)
    out = decoder.statistics(resid, targets, top_k=2, vocab_chunk=vocab_chunk, token_chunk=2)
    # Each is a difference of float32 terms as large as the log-partition (|lse| reaches the hundreds at scale 20),
    # so rounding may leave a few ulps of |lse| below zero (one ulp of a 200-nat lse is 1.5e-5): bound by that.
    ulps = 4 * torch.finfo(torch.float32).eps * out["log_partition"].abs()
    pair = ulps + ulps[-1:]  # KL terms come from the row's and the final row's log-partitions
    assert (out["kl_final_row"] >= -pair).all() and (out["kl_row_final"] >= -pair).all()
    assert (out["entropy"] >= -ulps).all() and (out["entropy"] <= math.log(40) + ulps).all()
    assert ((out["target_ranks"] >= 1) | (out["target_ranks"] == -1)).all()


def test_bad_chunk_sizes_and_widths_are_refused():
    resid, decoder, targets = random_case()
    with pytest.raises(ValueError, match="chunk sizes must be positive"):
        decoder.statistics(resid, targets, top_k=2, vocab_chunk=0, token_chunk=4)
    with pytest.raises(ValueError, match="exact only up to 2\\^24 columns"):
        decoder.statistics(resid, targets, top_k=2, vocab_chunk=2**24 + 1, token_chunk=4)
    wide = decoder.statistics(resid, targets, top_k=2, vocab_chunk=40000, token_chunk=4)  # was refused (int16)
    torch.testing.assert_close(wide["entropy"], decoder.statistics(resid, targets, top_k=2)["entropy"],
                               atol=5e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="different model"):
        decoder.statistics(resid[..., :5], targets, top_k=2, vocab_chunk=10, token_chunk=4)
    with pytest.raises(ValueError, match="top_k"):
        decoder.statistics(resid, targets, top_k=0, vocab_chunk=10, token_chunk=4)


def test_default_tiles_stack_rows_and_tokens_and_give_the_chunked_result():
    """With no chunk sizes the readout picks tiles for W_U's device (rows x tokens vectors per matmul) and
    agrees with explicit tiny tiles: ids and ranks exactly, floats within rounding."""
    resid, decoder, targets = random_case(rows=5, tokens=11, vocab=300, seed=17)
    vocab_chunk, token_chunk = readout.tile_sizes(torch.device("cpu"), 5, 11, 300)
    assert vocab_chunk == 300 and token_chunk == 11  # small work: one tile
    assert readout.tile_sizes(torch.device("cpu"), 31, 256, 49152) == (512, 128)  # 2 blocks of 31 x 128 vectors
    assert readout.tile_sizes(torch.device("cpu"), 31, 6, 49152) == (1024, 6)  # a short prompt: fewer, wider tiles
    assert readout.tile_sizes(torch.device("cpu"), 5000, 2, 49152) == (256, 1)  # more rows than a block holds
    auto = decoder.statistics(resid, targets, 4)
    tiny = decoder.statistics(resid, targets, 4, vocab_chunk=7, token_chunk=2)
    for name, value in tiny.items():
        if value.is_floating_point():
            torch.testing.assert_close(auto[name], value, atol=5e-5, rtol=1e-5, equal_nan=True, msg=name)
        else:
            assert torch.equal(auto[name], value), name


def test_exact_float32_tiles_go_through_onednn_on_an_x86_cpu():
    """The CPU speed the README reports is oneDNN's: a torch that renamed or dropped the op would silently fall
    back to MKL (tiles up to 1.2x slower on AVX-512), so x86 machines assert the choice. Only exact float32 takes
    it, on a CPU; a ``[d_model, vocab]`` W_U's chunks are handed over as contiguous rows (a strided view of
    them runs three orders of magnitude slower)."""
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available():
        assert readout.onednn_matmul(torch.device("cpu"))
    assert not readout.onednn_matmul(torch.device("meta"))
    W_U = torch.randn(16, 100)  # contiguous [d_model, vocab], as TransformerLens's HookedTransformer holds it
    assert not readout.Unembedding(W_U, None, None, "bf16x3").onednn
    unembedding = readout.Unembedding(W_U, None, None, "float32")
    if unembedding.onednn:
        rows, _, _ = unembedding.chunk(10, 42)
        assert rows.is_contiguous() and torch.equal(rows, W_U[:, 10:42].T)


def test_tf32_is_refused_off_cuda_and_unknown_precisions_are_refused():
    resid, decoder, targets = random_case()
    with pytest.raises(ValueError, match="precision='tf32' needs W_U on a CUDA device.*'bf16x3'"):
        decoder.statistics(resid, targets, 2, precision="tf32")
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        decoder.statistics(resid, targets, 2, precision="fp8")


@pytest.mark.parametrize("bf16_weights", [False, True])
def test_split_bfloat16_stays_close_to_float32(bf16_weights):
    """bf16x3 keeps about 16 mantissa bits of each operand (hi + lo), so its logits differ from float32 by
    about 2^-16 of the terms' size, far below bfloat16's own 2^-8: checked against both, relative to the
    logits' scale. A final row against itself is still exactly zero (same tile arithmetic)."""
    resid, decoder, targets = random_case(rows=4, tokens=16, d=64, vocab=500, seed=23)
    if bf16_weights:  # a bfloat16 model: W_U has no low part, only the activations are split
        decoder = Decoder(norm_kind=decoder.norm_kind, W_U=decoder.W_U.bfloat16(), norm_weight=decoder.norm_weight,
                          norm_bias=decoder.norm_bias, b_U=decoder.b_U)
    exact = decoder.statistics(resid, targets, 5, reductions=readout.REDUCTIONS)
    split = decoder.statistics(resid, targets, 5, reductions=readout.REDUCTIONS, precision="bf16x3")
    normed = readout.apply_final_norm(resid, decoder.norm_kind, decoder.norm_weight, decoder.norm_bias, 1e-5)
    scale = float((normed.abs() @ decoder.W_U.float().abs()).max())  # bound on |sum of the products|
    # Error of a bf16x3 logit: each product is exact up to the dropped lo*lo term (~2^-16 relative) and the
    # rounding of the split (2^-17 each side), summed: a few times 2^-16 of the absolute-terms sum.
    bound = 4 * 2.0**-16 * scale
    plain = torch.einsum("rnd,dv->rnv", normed.bfloat16().float(), decoder.W_U.bfloat16().float())
    assert (plain - readout.unembed(normed, decoder.W_U, None, None)).abs().max() > 8 * bound  # bf16 alone: far worse
    for name in ("entropy", "kl_final_row", "kl_row_final", "js_final", "tv_final", "log_partition"):
        torch.testing.assert_close(split[name], exact[name], atol=4 * bound, rtol=0, msg=name)
    assert torch.equal(split["kl_final_row"][-1], torch.zeros(16))
    assert torch.equal(split["kl_row_final"][-1], torch.zeros(16))
    assert torch.equal(split["js_final"][-1], torch.zeros(16))
    assert torch.equal(split["kl_input_row"][0], torch.zeros(16))
    assert (split["final_top1_rank"][-1] == 1).all()


@pytest.mark.parametrize("vocab_chunk", [512, 256, 200])
def test_top_k_from_the_largest_groups_equals_the_full_top_k(vocab_chunk):
    """Tiles whose width a group size divides take the top-k from the k groups with the largest maxima
    (512: 8 groups of 64, 256: 8 of 32, 200: 25 of 8); the result is the full-vocabulary top-k."""
    assert readout._group_size(vocab_chunk) is not None
    resid, decoder, targets = random_case(rows=3, tokens=20, d=16, vocab=2000, seed=29)
    out = decoder.statistics(resid, targets, top_k=5, vocab_chunk=vocab_chunk, token_chunk=7)
    check_against_reference(out, full_reference(resid, decoder, 5, targets))


@pytest.mark.parametrize("vectors", [1, 7, 14, 200, 3968])
def test_the_tile_matmul_gives_the_same_bits_with_one_thread_and_two(vectors):
    """The thread choice (``_ThreadChoice``) and the two-block workers (``_map_blocks``) are free to run a tile's
    matmul on one thread or two only because its product is bitwise the same either way. That holds for
    oneDNN (the x86 choice) but not for MKL: on an AVX2-only EPYC MKL's product of 7 rows differed in the last
    bits between one thread and two, so the same call could give different floats from run to run. Few rows
    are a short prompt's final row; 3,968 a 256-token block of SmolLM2 (``W_U`` held as ``lm_head.weight``)."""
    g = torch.Generator().manual_seed(vectors)
    W_U = torch.randn(4096, 576, generator=g).T  # [d_model, vocab], a view of [vocab, d_model] rows
    unembedding = readout.Unembedding(W_U, None, None, "float32")
    a = unembedding.operand(torch.randn(vectors, 576, generator=g))
    before = torch.get_num_threads()
    try:
        products = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            products.append([unembedding.logits(a, unembedding.chunk(v0, v0 + 1024), torch.empty(vectors, 1024))
                             for v0 in (0, 2048)])
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*products):
        assert torch.equal(one, two)


def test_the_thread_policy_changes_no_number_and_restores_the_threads(monkeypatch):
    """A tile's matmul and its reductions each run with the caller's threads or with one, whichever the call
    measures faster (``_ThreadChoice``): safe only because both give bitwise the same result with any number
    of threads. Both settings forced from the first tile give identical results for every reduction, the
    adaptive policy tries both, and the caller's thread count is back after the call and after an error."""
    resid, decoder, targets = random_case(rows=5, tokens=40, d=32, vocab=6000, seed=3)
    every = list(readout.REDUCTIONS)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        original = readout._ThreadChoice.begin

        def spy(self):
            original(self)
            seen.append(torch.get_num_threads())

        monkeypatch.setattr(readout._ThreadChoice, "begin", spy)
        adaptive = readout.lens_statistics(resid, decoder, 5, targets, vocab_chunk=256, reductions=every)
        assert {1, 2} <= set(seen)  # both settings were measured on this call's tiles
        assert torch.get_num_threads() == 2
        forced = {}
        for threads in (1, 2):
            monkeypatch.setattr(readout._ThreadChoice, "begin",
                                lambda self, t=threads: (setattr(self, "current", t), torch.set_num_threads(t)))
            forced[threads] = readout.lens_statistics(resid, decoder, 5, targets, vocab_chunk=256, reductions=every)
            assert torch.get_num_threads() == 2
        for name in forced[1]:
            for other in (forced[2], adaptive):
                assert torch.equal(forced[1][name].nan_to_num(), other[name].nan_to_num()), name
        monkeypatch.setattr(readout._ThreadChoice, "begin",
                            lambda self: (setattr(self, "current", 1), torch.set_num_threads(1)))
        monkeypatch.setattr(readout, "_merge_top_k", lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            readout.lens_statistics(resid, decoder, 5, targets, vocab_chunk=256)
        assert torch.get_num_threads() == 2  # put back although the tile failed with one thread set
    finally:
        torch.set_num_threads(before)


def test_token_blocks_on_two_workers_give_every_number_of_one_thread_and_restore_the_threads(monkeypatch):
    """With two threads and several token blocks, blocks run two at a time, each in its own Python thread on
    one OpenMP thread (``_map_blocks``). Every reduction is bitwise what one thread gives, both workers really
    computed blocks, the grad mode reaches the workers, and the caller's thread count is back after the call
    and after an error raised in a worker (which reaches the caller). Under a torch mode (per thread, so a
    worker would miss it) every block runs in the caller's thread."""
    import threading

    resid, decoder, targets = random_case(rows=5, tokens=40, d=32, vocab=3000, seed=5)
    every = list(readout.REDUCTIONS)
    before = torch.get_num_threads()
    original = readout._lens_block
    seen = []

    def spy(*args):
        seen.append((threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled()))
        return original(*args)

    monkeypatch.setattr(readout, "_lens_block", spy)
    try:
        torch.set_num_threads(1)
        alone = readout.lens_statistics(resid, decoder, 5, targets, vocab_chunk=256, token_chunk=6, reductions=every)
        assert len(seen) == 7 and len({ident for ident, *_ in seen}) == 1
        torch.set_num_threads(2)
        seen.clear()
        with torch.no_grad():
            shared = readout.lens_statistics(resid, decoder, 5, targets, vocab_chunk=256, token_chunk=6,
                                             reductions=every)
        assert torch.get_num_threads() == 2
        assert len(seen) == 7 and len({ident for ident, *_ in seen}) == 2  # both workers decoded blocks
        assert {(threads, grad) for _, threads, grad in seen} == {(1, False)}
        for name in alone:
            assert torch.equal(alone[name].nan_to_num(), shared[name].nan_to_num()), name

        calls = []

        def fails_on_the_third(*args):
            calls.append(1)
            if len(calls) == 3:
                raise ZeroDivisionError("block 3")
            return original(*args)

        monkeypatch.setattr(readout, "_lens_block", fails_on_the_third)
        with pytest.raises(ZeroDivisionError, match="block 3"):
            readout.lens_statistics(resid, decoder, 5, targets, vocab_chunk=256, token_chunk=6)
        assert torch.get_num_threads() == 2

        class Mode(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        monkeypatch.setattr(readout, "_lens_block", spy)
        seen.clear()
        with Mode():
            readout.lens_statistics(resid, decoder, 5, targets, vocab_chunk=256, token_chunk=6)
        assert {ident for ident, *_ in seen} == {threading.get_ident()}
    finally:
        torch.set_num_threads(before)
