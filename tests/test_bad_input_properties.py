"""Property-based hostile input (issue 25): generated bad (and good) arguments thrown at every public entry point
on both backends (TransformerLens bridge and nnsight).

For each generated example the call must either return a result (finite statistics where the README's
"Numerics and limits" promises them; for input valid on both backends, the same numbers on both, to the
tolerance of ``tests/test_backends.py``) or raise an ``lp.LensError`` whose message names the offending
argument: never another exception type, never a hang (a 60 s alarm per example), never a file changed outside
the requested output (the working directory is snapshot before and after).

Every argument strategy draws ``(value, verdict)``: ``"ok"`` (must be accepted), ``"bad"`` (must be refused)
or ``"either"`` (accepting or refusing are both fine, e.g. duplicated layers; a refusal must still name it).
Cross-backend comparisons run on token-id tensors (the one-call forms tokenise text differently on the two
backends regarding BOS, which is being fixed separately).
"""

import contextlib
import os
import signal
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lens_plugins as lp
from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends import transformer_lens as lpt
from tiny_models import VOCAB, tiny_model

TOL = 1e-4  # as tests/test_backends.py: the same weights through two forward implementations
ALARM_S = 60
N_LAYERS = 3  # tiny Llama: rows embed, 1_pre, 2_pre, 2_post (+ mid/sublayer rows)
CONTEXT = 128

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


# --- models, built once per module --------------------------------------------------------------------------


def _bridge(hf, tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers("tiny-llama", hf_model=hf, tokenizer=tokenizer).eval()


@pytest.fixture(scope="module")
def tl(smollm2_tokenizer):
    return _bridge(tiny_model("llama"), smollm2_tokenizer)


@pytest.fixture(scope="module")
def nn(smollm2_tokenizer):
    return lpn.wrap_model(tiny_model("llama"), smollm2_tokenizer)


@pytest.fixture(scope="module")
def half(smollm2_tokenizer):
    """``{(backend, dtype): model}`` of the tiny Llama in float16 and bfloat16."""
    models = {}
    for dtype in (torch.float16, torch.bfloat16):
        models["nnsight", dtype] = lpn.wrap_model(tiny_model("llama").to(dtype), smollm2_tokenizer)
        models["transformer_lens", dtype] = _bridge(tiny_model("llama").to(dtype), smollm2_tokenizer)
    return models


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The working directory of every call: nothing may appear in it but a requested output."""
    path = tmp_path_factory.mktemp("cwd")
    old = os.getcwd()
    os.chdir(path)
    yield path
    os.chdir(old)


# --- the contract ---------------------------------------------------------------------------------------------


class _Hang(BaseException):
    """Raised by the alarm: not an Exception, so no ``except Exception`` in the package can swallow it."""


@contextlib.contextmanager
def alarm(seconds=ALARM_S):
    def ring(signum, frame):
        raise _Hang(f"the call ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(root):
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            stat = os.lstat(path)
            found[path] = (stat.st_size, stat.st_mtime_ns, os.path.isdir(path))
    return found


def verdict_of(args):
    """``(must_fail, may_name)`` of ``{name: (value, verdict)}``: refused if any is bad, and a refusal must
    name one of the bad (or questionable) arguments."""
    bad = [name for name, (_, v) in args.items() if v == "bad"]
    either = [name for name, (_, v) in args.items() if v == "either"]
    return bool(bad), bad + either


def values(args):
    return {name: value for name, (value, _) in args.items()}


class Outcome:
    def __init__(self, result=None, error=None):
        self.result, self.error = result, error


def attempt(call, names, must_fail, *, root=None, allowed=(), aliases=()):
    """Run ``call`` under the contract: a result (then ``must_fail`` is false) or a ``LensError`` whose message
    names one of ``names`` (or an alias, e.g. the path it could not write); no other exception, no hang, no
    file changed under ``root`` but ``allowed``."""
    before = snapshot(root) if root is not None else None
    try:
        with alarm():
            result = call()
    except lp.LensError as error:
        message = str(error)
        assert names, f"valid input refused: {type(error).__name__}: {message}"
        assert any(name in message for name in list(names) + list(aliases)), (
            f"the message does not name the offending argument {names}: {type(error).__name__}: {message}")
        outcome = Outcome(error=error)
    except _Hang:
        raise AssertionError("the call hung (no answer within the alarm)") from None
    except Exception as error:  # noqa: BLE001 - the property under test
        raise AssertionError(f"not a LensError: {type(error).__module__}.{type(error).__name__}: {error}") from error
    else:
        assert not must_fail, f"bad input {names} was accepted"
        outcome = Outcome(result=result)
    if root is not None:
        after = snapshot(root)
        changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
        changed -= {str(a) for a in allowed}
        changed = {p for p in changed if not any(p.startswith(str(a) + os.sep) for a in allowed)}
        assert not changed, f"files changed outside the requested output: {sorted(changed)}"
    return outcome


def finite_lens(result):
    """What the README promises of a ``LensResult``: float32 statistics, finite wherever they score something
    (NaN only for the last position's next token, rank -1 there)."""
    for name in ("top_logprobs", "entropy", "kl_final_row", "kl_row_final", "js_final", "tv_final",
                 "target_logprobs", "set_logprobs", "input_token_logprob", "log_partition"):
        value = getattr(result, name, None)
        if value is None or value.numel() == 0:
            continue
        assert value.dtype == torch.float32, f"{name} is {value.dtype}"
        assert torch.isfinite(value).all(), f"{name} holds a non-finite number"
    nxt = result.next_token_logprob
    if nxt is not None and nxt.numel():
        assert nxt.dtype == torch.float32
        real = result.attention_mask.bool()  # [batch, seq]
        has_next = torch.zeros_like(real)
        has_next[:, :-1] = real[:, :-1] & real[:, 1:]
        scored = has_next[:, result.positions]  # [batch, pos]
        assert torch.isfinite(nxt[:, scored]).all(), "next_token_logprob is not finite where there is a next token"
        assert torch.isnan(nxt[:, ~scored]).all()
        assert (result.next_token_rank[:, ~scored] == -1).all()


def same_lens(a, b):
    assert a.labels == b.labels and a.positions == b.positions
    assert a.reductions == b.reductions and a.target_names == b.target_names and a.set_names == b.set_names
    assert torch.equal(a.token_ids, b.token_ids)
    for name in ("top_ids", "target_ranks", "set_ranks", "next_token_rank"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            # ids compare exactly, except where two tokens tie within the backends' rounding
            if name == "top_ids" and not torch.equal(x, y):
                gaps = (a.top_logprobs[..., :-1] - a.top_logprobs[..., 1:]).abs().min()
                assert gaps < 10 * TOL, f"{name} differ between the backends"
            elif name != "top_ids":
                assert torch.equal(x, y), f"{name} differ between the backends"
    for name in ("top_logprobs", "entropy", "kl_final_row", "kl_row_final", "js_final", "tv_final",
                 "target_logprobs", "set_logprobs", "next_token_logprob"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, atol=TOL, rtol=0, equal_nan=True, msg=name)


# --- strategies: (value, verdict) -------------------------------------------------------------------------------

ok = lambda s: s.map(lambda v: (v, "ok"))  # noqa: E731
bad = lambda s: s.map(lambda v: (v, "bad"))  # noqa: E731
either = lambda s: s.map(lambda v: (v, "either"))  # noqa: E731

# Words the SmolLM2 tokenizer maps to one id below the tiny models' 1000 (so that a text prompt or target fits).
ONE_TOKEN = [" the", " it", " is", " in", " of", " and", " to", " a", "a", " that"]
MULTI_TOKEN = [" antidisestablishment", "hello world", "  the the", "ĉĉĉ", "🙂🙂"]


def token_ids(min_size=1, max_size=8):
    return st.lists(st.integers(3, VOCAB - 1), min_size=min_size, max_size=max_size).map(
        lambda ids: torch.tensor([ids]))


def top_k_strategy():
    return st.one_of(ok(st.integers(1, 12)), ok(st.just(VOCAB)), either(st.integers(VOCAB + 1, 5000)),
                     bad(st.integers(-3, 0)), bad(st.sampled_from([1.5, "5", None, True])))


def positions_strategy(seq):
    return st.one_of(
        ok(st.none()), ok(st.integers(-seq, seq - 1)),
        ok(st.lists(st.integers(-seq, seq - 1), min_size=1, max_size=4, unique=True)),
        either(st.lists(st.integers(-seq, seq - 1), min_size=2, max_size=4).filter(lambda p: len(set(p)) < len(p))),
        bad(st.integers(seq, seq + 50)), bad(st.integers(-seq - 50, -seq - 1)), bad(st.just([])),
        bad(st.sampled_from([1.0, "a", [0.5], [None]])),
    )


def targets_strategy():
    single = st.one_of(st.sampled_from(ONE_TOKEN), st.integers(0, VOCAB - 1))
    wrong = st.one_of(st.sampled_from(MULTI_TOKEN + ["", "   "]), st.integers(VOCAB, 10**6),
                      st.integers(-10**6, -1), st.floats(allow_nan=True), st.none())
    return st.one_of(
        ok(st.just(())), ok(st.lists(single, min_size=1, max_size=3)),
        # A bare target string, not in a list. A bare *int* is left out: DEFECT (reported, typecheck.py /
        # TransformerLens signature, not ours to edit): TransformerLens's ``targets: Sequence[str | int]``
        # refuses ``targets=5`` while nnsight's in-trace lens accepts it as ``[5]``.
        either(st.sampled_from(ONE_TOKEN)),
        bad(st.lists(single, max_size=2).flatmap(lambda good: wrong.map(lambda w: good + [w]))),
    )


def token_sets_strategy():
    member = st.one_of(st.sampled_from(ONE_TOKEN), st.integers(0, VOCAB - 1))
    names = st.text(string.ascii_letters, min_size=1, max_size=4)
    return st.one_of(
        ok(st.none()), ok(st.dictionaries(names, st.lists(member, min_size=1, max_size=3), min_size=1, max_size=2)),
        bad(st.just({"s": []})), bad(st.dictionaries(names, st.just([VOCAB + 7]), min_size=1, max_size=1)),
        bad(st.dictionaries(names, st.just([" antidisestablishment"]), min_size=1, max_size=1)),
        bad(st.sampled_from([[" the"], " the", 3])), bad(st.just({1: [" the"]})),
        either(st.just({"s": " the"})), either(st.just({"s": [" the", " the"]})),
    )


REDUCTION_NAMES = ["top_k", "entropy", "kl_final_row", "next_token", "input_token"]


def reductions_strategy():
    return st.one_of(
        ok(st.lists(st.sampled_from(REDUCTION_NAMES), min_size=1, max_size=4, unique=True)),
        either(st.sampled_from(REDUCTION_NAMES)),  # a single name (README: accepted on every verb)
        either(st.just([])), either(st.just(["entropy", "entropy"])),
        bad(st.lists(st.sampled_from(["nope", "Entropy", "", "kl"]), min_size=1, max_size=2)),
        bad(st.sampled_from([["entropy", 3], [None]])),
    )


def layers_strategy(n_rows=N_LAYERS + 1):
    label = st.sampled_from(["embed", "1_pre", "2_pre", "2_post"])
    index = st.integers(-n_rows, n_rows - 1)
    return st.one_of(
        ok(st.none()), ok(st.lists(st.one_of(label, index), min_size=1, max_size=3, unique=True)),
        either(st.lists(index, min_size=2, max_size=3).filter(lambda x: len(set(x)) < len(x))),
        either(st.just([])), either(label),
        bad(st.lists(st.integers(n_rows, 99), min_size=1, max_size=2)),
        bad(st.lists(st.integers(-99, -n_rows - 1), min_size=1, max_size=2)),
        bad(st.sampled_from([["7_pre"], ["zz"], ["model.layers"], [1.5], [None], ["0_mid"]])),
    )


def lens_strategy():
    return st.one_of(
        ok(st.none()), ok(st.just(lp.LogitLens())), ok(st.just(lp.TunedLens(64, N_LAYERS))),
        bad(st.sampled_from([("width", 32, N_LAYERS), ("depth", 64, 5), ("shallow", 64, 1)]).map(
            lambda spec: lp.TunedLens(spec[1], spec[2]))),
        bad(st.sampled_from([object(), "logit", 3, torch.zeros(3)])),
    )


# --- 1. the logit lens: cache / in-trace forms on the same token ids, both backends ------------------------------


def tl_lens(tl, tokens, **kwargs):
    _, cache = tl.run_with_cache(tokens, names_filter=lpt.hook_filter(tl))
    return cache.lens.logit_lens(tokens=tokens, **kwargs)


def nn_lens(nn, tokens, **kwargs):
    with nn.trace(tokens):
        saved = lpn.logit_lens(nn, **kwargs)
    return lpn.logit_lens_result(saved, nn)


@st.composite
def lens_calls(draw):
    tokens = draw(token_ids(1, 7))
    seq = tokens.shape[1]
    args = {}
    for name, strategy in (("top_k", top_k_strategy()), ("positions", positions_strategy(seq)),
                           ("targets", targets_strategy()), ("token_sets", token_sets_strategy()),
                           ("reductions", reductions_strategy()), ("layers", layers_strategy()),
                           ("lens", lens_strategy())):
        if draw(st.booleans()):
            args[name] = draw(strategy)
    return tokens, args


@settings(max_examples=40, **SETTINGS)
@given(call=lens_calls())
def test_logit_lens_both_backends(call, tl, nn, workdir):
    tokens, args = call
    must_fail, names = verdict_of(args)
    kwargs = values(args)
    out = {}
    for backend, run in (("transformer_lens", lambda: tl_lens(tl, tokens, **kwargs)),
                         ("nnsight", lambda: nn_lens(nn, tokens, **kwargs))):
        out[backend] = attempt(run, names, must_fail, root=workdir)
        if out[backend].result is not None:
            finite_lens(out[backend].result)
    a, b = out["transformer_lens"], out["nnsight"]
    assert (a.error is None) == (b.error is None), (
        f"the backends disagree: transformer_lens {a.error!r}, nnsight {b.error!r}")
    if a.result is not None:
        same_lens(a.result, b.result)


# --- 2. prompts through the one-call forms ------------------------------------------------------------------------

# Joined words keep their own tokens only when each starts with a space ("a" + "a" is the one token "aa").
WORDS = st.lists(st.sampled_from([w for w in ONE_TOKEN if w.startswith(" ")]), min_size=1, max_size=6).map("".join)


def prompt_strategy():
    return st.one_of(
        ok(WORDS), ok(st.lists(WORDS, min_size=1, max_size=3)),
        bad(st.sampled_from(["", " ", "\n\t ", "\u3000"])),
        bad(st.lists(WORDS, max_size=2).map(lambda good: good + [""])),
        bad(st.lists(WORDS, max_size=2).map(lambda good: good + ["  \n"])),
        bad(st.just([])),
        bad(st.integers(130, 400).map(lambda n: " the" * n)),  # longer than the context of 128
        bad(st.sampled_from([None, 3, b"the", torch.tensor([[5, 6]]), torch.tensor([[5.0, 6.0]]), [" the", 3]])),
    )


@settings(max_examples=30, **SETTINGS)
@given(prompt=prompt_strategy(), top_k=top_k_strategy())
def test_one_call_lens_prompts(prompt, top_k, tl, nn, workdir):
    args = {"prompt": prompt, "top_k": top_k}
    must_fail, names = verdict_of(args)
    kwargs = values(args)
    for verb in (lpt.run_logit_lens, lpn.run_logit_lens):
        model = tl if verb is lpt.run_logit_lens else nn
        out = attempt(lambda: verb(model, kwargs["prompt"], top_k=kwargs["top_k"]), names, must_fail, root=workdir)
        if out.result is not None:
            finite_lens(out.result)
            n_prompts = 1 if isinstance(kwargs["prompt"], str) else len(kwargs["prompt"])
            assert out.result.token_ids.shape[0] == n_prompts


# --- 3. logit difference and attribution ------------------------------------------------------------------------


def token_set_strategy():
    single = st.one_of(st.sampled_from(ONE_TOKEN), st.integers(0, VOCAB - 1))
    return st.one_of(
        ok(single), ok(st.lists(single, min_size=1, max_size=3, unique=True)),
        bad(st.sampled_from(MULTI_TOKEN + ["", " "])), bad(st.integers(VOCAB, 10**6)), bad(st.integers(-10**6, -1)),
        bad(st.just([])), bad(st.just([" the", " the"])), bad(st.sampled_from([1.5, None, float("nan")])),
    )




@st.composite
def diff_calls(draw):
    tokens = draw(token_ids(1, 6))
    seq = tokens.shape[1]
    args = {"target": draw(token_set_strategy()), "distractor": draw(token_set_strategy())}
    if draw(st.booleans()):
        args["positions"] = draw(positions_strategy(seq))
    if draw(st.booleans()):
        args["layers"] = draw(layers_strategy())
    if draw(st.booleans()):
        args["lens"] = draw(lens_strategy())
    return tokens, args


@settings(max_examples=30, **SETTINGS)
@given(call=diff_calls())
def test_logit_diff_both_backends(call, tl, nn, workdir):
    tokens, args = call
    must_fail, names = verdict_of(args)
    kwargs = values(args)
    target, distractor = kwargs.pop("target"), kwargs.pop("distractor")

    def on_tl():
        _, cache = tl.run_with_cache(tokens, names_filter=lpt.hook_filter(tl))
        return cache.lens.logit_diff(target, distractor, **kwargs)

    def on_nn():
        with nn.trace(tokens):
            saved = lpn.logit_diff(nn, target, distractor, **kwargs)
        return lpn.logit_diff_result(saved, nn)

    a, b = (attempt(run, names, must_fail, root=workdir) for run in (on_tl, on_nn))
    assert (a.error is None) == (b.error is None), f"the backends disagree: {a.error!r} / {b.error!r}"
    if a.result is not None:
        assert a.result.labels == b.result.labels and a.result.positions == b.result.positions
        assert torch.isfinite(a.result.values).all() and torch.isfinite(b.result.values).all()
        torch.testing.assert_close(a.result.values, b.result.values, atol=TOL, rtol=0)


@st.composite
def attribution_calls(draw):
    tokens = draw(token_ids(1, 6))
    seq = tokens.shape[1]
    args = {"target": draw(token_set_strategy())}
    if draw(st.booleans()):
        args["distractor"] = draw(token_set_strategy())
    if draw(st.booleans()):
        args["position"] = draw(st.one_of(ok(st.integers(-seq, seq - 1)), bad(st.integers(seq, seq + 9)),
                                          bad(st.integers(-seq - 9, -seq - 1)), bad(st.sampled_from([None, 1.5, [0]]))))
    if draw(st.booleans()):
        args["by"] = draw(st.one_of(ok(st.sampled_from(["component", "layer", "head"])),
                                    bad(st.sampled_from(["heads", "", "Layer", 3]))))
    return tokens, args


@settings(max_examples=30, **SETTINGS)
@given(call=attribution_calls())
def test_attribution_both_backends(call, tl, nn, workdir):
    tokens, args = call
    must_fail, names = verdict_of(args)
    kwargs = values(args)
    target, distractor = kwargs.pop("target"), kwargs.pop("distractor", None)
    by = kwargs.pop("by", "component")

    def on_tl():
        _, cache = tl.run_with_cache(tokens, names_filter=lpt.hook_filter(tl, attribution=True))
        return cache.lens.attribution(target, distractor, by=by, **kwargs)

    def on_nn():
        with nn.trace(tokens):
            saved = lpn.attribution(nn, target, distractor, **kwargs)
        return lpn.attribution_result(saved, nn, by=by)

    a, b = (attempt(run, names, must_fail, root=workdir) for run in (on_tl, on_nn))
    assert (a.error is None) == (b.error is None), f"the backends disagree: {a.error!r} / {b.error!r}"
    if a.result is not None:
        assert a.result.labels == b.result.labels
        assert torch.isfinite(a.result.values).all() and torch.isfinite(b.result.values).all()
        torch.testing.assert_close(a.result.values, b.result.values, atol=TOL, rtol=0)


# --- 4. generation lens and DoLa --------------------------------------------------------------------------------


def text_strategy():
    return st.one_of(
        ok(WORDS), ok(token_ids(1, 6)),
        bad(st.sampled_from(["", "  ", "\n"])),
        bad(st.integers(130, 300).map(lambda n: " the" * n)),  # past the context of 128
        bad(st.sampled_from([torch.zeros(1, 0, dtype=torch.long), torch.tensor([[5.0, 6.0]]), torch.tensor([[5, 1003]]),
                             torch.tensor([[[5, 6]]])])),
        bad(st.sampled_from([torch.tensor([[5, 6], [7, 8]]), None, 3, [" the"]])),
    )


def max_new_tokens_strategy():
    return st.one_of(ok(st.integers(1, 3)), bad(st.integers(-3, 0)), bad(st.sampled_from([1.5, None, "2"])),
                     bad(st.just(CONTEXT + 10)))


@settings(max_examples=20, **SETTINGS)
@given(text=text_strategy(), max_new_tokens=max_new_tokens_strategy(), top_k=top_k_strategy(),
       targets=targets_strategy(), reductions=reductions_strategy())
def test_generation_lens(text, max_new_tokens, top_k, targets, reductions, tl, nn, workdir):
    args = dict(text=text, max_new_tokens=max_new_tokens, top_k=top_k, targets=targets, reductions=reductions)
    must_fail, names = verdict_of(args)
    kwargs = values(args)
    text_value = kwargs.pop("text")
    out = {}
    for name, verb, model in (("transformer_lens", lpt.run_generation_lens, tl),
                              ("nnsight", lpn.run_generation_lens, nn)):
        out[name] = attempt(lambda: verb(model, text_value, **kwargs), names, must_fail, root=workdir)
        if out[name].result is not None:
            finite_lens(out[name].result.lens if hasattr(out[name].result, "lens") else out[name].result)
    a, b = out.values()
    assert (a.error is None) == (b.error is None), f"the backends disagree: {a.error!r} / {b.error!r}"
    if a.result is not None and isinstance(text_value, torch.Tensor):
        assert torch.equal(a.result.token_ids, b.result.token_ids)


def dola_layers_strategy():
    return st.one_of(ok(st.sampled_from(["high", "low"])), ok(st.lists(st.integers(0, N_LAYERS - 1), min_size=1,
                                                                            max_size=2, unique=True)),
                     bad(st.sampled_from(["middle", "", [99], [-9], [], [1.5], None])))


@settings(max_examples=20, **SETTINGS)
@given(text=text_strategy(), max_new_tokens=max_new_tokens_strategy(), layers=dola_layers_strategy(),
       alpha=st.one_of(ok(st.sampled_from([0.1, 0.5, 1.0])), bad(st.sampled_from([0.0, -0.1, 1.5, float("nan")]))),
       repetition_penalty=st.one_of(ok(st.sampled_from([None, 1.0, 1.2])),
                                    bad(st.sampled_from([0.0, -1.0, float("nan"), float("inf")]))))
def test_dola(text, max_new_tokens, layers, alpha, repetition_penalty, tl, nn, workdir):
    args = dict(text=text, max_new_tokens=max_new_tokens, layers=layers, alpha=alpha,
                repetition_penalty=repetition_penalty)
    must_fail, names = verdict_of(args)
    kwargs = values(args)
    text_value = kwargs.pop("text")
    out = [attempt(lambda: verb(model, text_value, **kwargs), names, must_fail, root=workdir)
           for verb, model in ((lpt.run_dola, tl), (lpn.run_dola, nn))]
    a, b = out
    assert (a.error is None) == (b.error is None), f"the backends disagree: {a.error!r} / {b.error!r}"
    if a.result is not None and isinstance(text_value, torch.Tensor):
        assert a.result.token_ids == b.result.token_ids if not isinstance(a.result.token_ids, torch.Tensor) \
            else torch.equal(a.result.token_ids, b.result.token_ids)


# --- 5. Patchscopes ---------------------------------------------------------------------------------------------


def mapping_strategy():
    return st.one_of(
        ok(st.none()), ok(st.just(lambda h: h * 0.5)), ok(st.just((None, torch.zeros(64)))),
        bad(st.sampled_from([lambda h: h[:, :32], lambda h: h.sum(), lambda h: h[:1], lambda h: None,
                             lambda h: h * float("nan"), lambda h: h.double().numpy()])),
        bad(st.sampled_from(["identity", 3, (torch.zeros(3, 3), None), (torch.eye(64),), object()])),
    )


@st.composite
def patchscope_calls(draw):
    source = draw(token_ids(2, 6))
    seq = source.shape[1]
    args = {}
    if draw(st.booleans()):
        args["layers"] = draw(layers_strategy())
    if draw(st.booleans()):
        args["positions"] = draw(positions_strategy(seq))
    if draw(st.booleans()):
        args["mapping"] = draw(mapping_strategy())
    if draw(st.booleans()):
        args["target_layer"] = draw(st.one_of(ok(st.sampled_from([0, -1, "2_pre", "embed"])),
                                              bad(st.sampled_from([99, "9_pre", "zz", 1.5]))))
    if draw(st.booleans()):
        args["target_position"] = draw(st.one_of(ok(st.integers(-3, 2)), bad(st.integers(40, 60))))
    if draw(st.booleans()):
        args["top_k"] = draw(top_k_strategy())
    if draw(st.booleans()):
        args["batch_size"] = draw(st.one_of(ok(st.integers(1, 8)), bad(st.integers(-2, 0))))
    if draw(st.booleans()):
        args["targets"] = draw(targets_strategy())
    return source, args


TARGET_PROMPT = torch.tensor([10, 11, 12, 13])  # token ids: the same on both backends


@settings(max_examples=25, **SETTINGS)
@given(call=patchscope_calls())
def test_patchscope_both_backends(call, tl, nn, workdir):
    source, args = call
    must_fail, names = verdict_of(args)
    kwargs = values(args)
    out = [attempt(lambda: verb(model, source, target_prompt=TARGET_PROMPT, **kwargs), names, must_fail,
                   root=workdir) for verb, model in ((lpt.run_patchscope, tl), (lpn.run_patchscope, nn))]
    a, b = out
    assert (a.error is None) == (b.error is None), f"the backends disagree: {a.error!r} / {b.error!r}"
    if a.result is not None:
        finite_lens(a.result.lens) if hasattr(a.result, "lens") else None
        assert a.result.labels == b.result.labels
        for name in ("entropy", "top_logprobs"):
            x, y = getattr(a.result, name, None), getattr(b.result, name, None)
            if x is not None:
                assert torch.isfinite(x).all()
                torch.testing.assert_close(x, y, atol=TOL, rtol=0)


# --- 6. attention ----------------------------------------------------------------------------------------------


def attention_layers_strategy():
    return st.one_of(ok(st.none()), ok(st.lists(st.integers(0, N_LAYERS - 1), min_size=1, max_size=3, unique=True)),
                     bad(st.lists(st.integers(N_LAYERS, 50), min_size=1, max_size=2)),
                     bad(st.lists(st.integers(-50, -N_LAYERS - 1), min_size=1, max_size=2)),
                     bad(st.sampled_from([[], [1.5], ["1"], 1, "0"])))


@settings(max_examples=25, **SETTINGS)
@given(tokens=token_ids(1, 6), layers=attention_layers_strategy())
def test_attention_both_backends(tokens, layers, tl, nn, workdir):
    args = {"layers": layers}
    must_fail, names = verdict_of(args)
    chosen = layers[0]

    def on_tl():
        _, cache = tl.run_with_cache(tokens, names_filter=lpt.attention_hook_filter(tl))
        return lpt.attention(cache, tokens, layers=chosen)

    def on_nn():
        with nn.trace(tokens):
            saved = lpn.attention(nn, chosen)
        return lpn.attention_result(saved, nn)

    a, b = (attempt(run, names, must_fail, root=workdir) for run in (on_tl, on_nn))
    assert (a.error is None) == (b.error is None), f"the backends disagree: {a.error!r} / {b.error!r}"
    if a.result is not None:
        assert a.result.layers == b.result.layers
        assert torch.isfinite(a.result.patterns).all()
        torch.testing.assert_close(a.result.patterns.float(), b.result.patterns.float(), atol=TOL, rtol=0)


@settings(max_examples=15, **SETTINGS)
@given(prompt=prompt_strategy(), layers=attention_layers_strategy())
def test_one_call_attention_prompts(prompt, layers, tl, nn, workdir):
    args = {"prompt": prompt, "layers": layers}
    must_fail, names = verdict_of(args)
    for verb, model in ((lpt.run_attention, tl), (lpn.run_attention, nn)):
        out = attempt(lambda: verb(model, prompt[0], layers[0]), names, must_fail, root=workdir)
        if out.result is not None:
            assert torch.isfinite(out.result.patterns).all()


# --- 7. module paths (nnsight's paths=) ---------------------------------------------------------------------------

GOOD_PATHS = {"layers": "model.layers", "final_norm": "model.norm", "lm_head": "lm_head"}


def paths_strategy():
    return st.one_of(
        ok(st.none()), ok(st.just(GOOD_PATHS)),
        bad(st.sampled_from([{**GOOD_PATHS, "layers": "model.nope"}, {**GOOD_PATHS, "lm_head": "lm_head..x"},
                             {**GOOD_PATHS, "final_norm": "model.gone"}])),
        # A partial dict (the table fills the rest) and an unknown key may be accepted.
        either(st.sampled_from([{"layers": "model.layers"}, {**GOOD_PATHS, "unknown": "x"}])),
        # The wrong kind of module, a weight, a non-string or empty path, and a paths= that is not a dict.
        bad(st.sampled_from([{**GOOD_PATHS, "layers": "model.norm"}, {**GOOD_PATHS, "lm_head": "model.embed_tokens.weight"},
                             {**GOOD_PATHS, "layers": 3}, {**GOOD_PATHS, "lm_head": ""},
                             {**GOOD_PATHS, "final_norm": "model.layers"}, ["model.layers"], "model.layers"])),
    )


@settings(max_examples=20, **SETTINGS)
@given(paths=paths_strategy(), verb=st.sampled_from(["logit_lens", "logit_diff", "attribution", "dola",
                                                       "generation_lens"]))
def test_paths(paths, verb, nn, workdir):
    must_fail, names = verdict_of({"paths": paths})
    value = paths[0]
    bad_values = [] if not isinstance(value, dict) else [str(v) for v in value.values()] + list(value)
    calls = {
        "logit_lens": lambda: lpn.run_logit_lens(nn, " the it", paths=value),
        "logit_diff": lambda: lpn.run_logit_diff(nn, " the it", " the", " it", paths=value),
        "attribution": lambda: lpn.run_attribution(nn, " the it", " the", paths=value),
        "dola": lambda: lpn.run_dola(nn, " the it", max_new_tokens=1, paths=value),
        "generation_lens": lambda: lpn.run_generation_lens(nn, " the it", max_new_tokens=1, paths=value),
    }
    attempt(calls[verb], names, must_fail, root=workdir, aliases=[v for v in bad_values if v])


# --- 8. output paths: lp.html_report and TunedLens.save ------------------------------------------------------------


@pytest.fixture(scope="module")
def small_result(nn):
    return lpn.run_logit_lens(nn, " the it is")


@settings(max_examples=20, **SETTINGS)
@given(kind=st.sampled_from(["fresh", "directory", "missing_parent", "existing", "existing_overwrite", "file_parent"]),
       writer=st.sampled_from(["html_report", "tuned_save"]), n=st.integers(0, 10**6))
def test_output_paths(kind, writer, n, small_result, tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    (root / "keep.txt").write_text("keep")
    (root / "dir").mkdir()
    (root / "dir" / "inner.txt").write_text("inner")
    (root / "plain").write_text("a file")
    existing = root / ("old.html" if writer == "html_report" else "old_lens")
    if writer == "html_report":
        existing.write_text("old")
    else:
        lp.TunedLens(64, N_LAYERS).save(existing)
    target = {
        "fresh": root / f"new{n}" / "x" if writer == "tuned_save" else root / f"new{n}.html",
        "directory": root / "dir" if writer == "html_report" else root / "plain",
        "missing_parent": root / "no" / "such" / "r.html" if writer == "html_report" else root / "plain" / "sub",
        "existing": existing, "existing_overwrite": existing,
        "file_parent": root / "plain" / "r.html",
    }[kind]
    overwrite = kind == "existing_overwrite"
    must_fail = kind not in ("fresh", "existing_overwrite")
    if writer == "html_report":
        call = lambda: lp.html_report(small_result, target, overwrite=overwrite)  # noqa: E731
    else:
        call = lambda: lp.TunedLens(64, N_LAYERS).save(target, overwrite=overwrite)  # noqa: E731
    allowed = [] if must_fail else [target] + ([root / f"new{n}"] if writer == "tuned_save" else [])
    attempt(call, ["path"], must_fail, root=root, allowed=allowed, aliases=[str(target), str(target.parent)])
    if not must_fail:
        assert target.exists()
        if writer == "tuned_save":
            assert lp.TunedLens.load(target) is not None


# --- 9. half-precision models: float32, finite statistics ---------------------------------------------------------


@settings(max_examples=20, **SETTINGS)
@given(tokens=token_ids(2, 8), dtype=st.sampled_from([torch.float16, torch.bfloat16]),
       backend=st.sampled_from(["transformer_lens", "nnsight"]), top_k=st.integers(1, 8),
       reductions=st.lists(st.sampled_from(["top_k", "entropy", "kl_final_row", "kl_row_final", "js_final",
                                             "next_token"]), min_size=1, max_size=4, unique=True),
       targets=st.lists(st.integers(0, VOCAB - 1), max_size=2, unique=True))
def test_half_precision_is_finite_float32(tokens, dtype, backend, top_k, reductions, targets, half, workdir):
    model = half[backend, dtype]
    run = tl_lens if backend == "transformer_lens" else nn_lens
    out = attempt(lambda: run(model, tokens, top_k=top_k, reductions=reductions, targets=targets), [], False,
                  root=workdir)
    finite_lens(out.result)
