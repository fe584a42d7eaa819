"""Checks for the course exercises (``07_exercises.ipynb``; worked answers in ``07_solutions.ipynb``).

Each ``check_*`` calls your function on cases whose answers it computes itself, with plain torch and, where a
model is needed, a Hugging Face Llama-family causal LM (the course uses SmolLM2-135M). It raises
``AssertionError`` saying which case failed and how, and returns ``True`` when every case passes. Nothing here
imports lens_plugins: the checks must not share code, or mistakes, with the package they teach.

The cases are built so that the usual slips fail, and when a wrong answer matches one of them the failure
names it ("did you add `b_U`?", "bits instead of nats?"): the check computes each designed slip itself and
compares. Anything your function raises is caught and reported with the case's name and its input shapes.
``run(check, function, ...)`` turns all of that into one printed verdict; ``check_quiz(answers, model,
tokenizer)`` marks the quiz, with an explanation for every answer.
"""

import math

import torch

__all__ = [
    "check_block_inputs",
    "check_early_exit",
    "check_entropy",
    "check_head_dla",
    "check_kl",
    "check_logit_lens",
    "check_patchscope",
    "check_quiz",
    "check_shortcut",
    "check_surfaced",
    "describe",
    "run",
]


# --- the machinery: calling your function, comparing, naming the slip --------------------------------------

def describe(value) -> str:
    """A short description of an input: a tensor's shape and dtype, a module's class, a number's value."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, torch.nn.Module):
        return type(value).__name__
    if isinstance(value, (int, float, bool, str)) or value is None:
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(describe(v) for v in value) + "]"
    return type(value).__name__


def _call(what: str, function, names: str, *args):
    """``function(*args)``; anything it raises but ``NotImplementedError`` becomes an ``AssertionError`` that
    names the case and the shapes of what it was given (``names``: the parameters, comma-separated)."""
    try:
        return function(*args)
    except NotImplementedError:
        raise
    except Exception as error:  # a student's function may raise anything: report it with the inputs
        shown = ", ".join(f"{n.strip()}={describe(a)}" for n, a in zip(names.split(","), args))
        raise AssertionError(f"{what}: your function raised {type(error).__name__}: {error}\n    inputs: {shown}") from error


def _close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> bool:
    if tuple(got.shape) != tuple(want.shape):
        return False
    got, want = got.detach().double(), want.detach().double()
    if not torch.isfinite(got).all():
        return False
    return (got - want).abs().max().item() <= atol + rtol * want.abs().max().item()


def _as_tensor(got, what: str) -> torch.Tensor:
    if isinstance(got, torch.Tensor):
        return got
    if isinstance(got, (int, float)):
        return torch.tensor(float(got))
    raise AssertionError(f"{what}: expected a torch.Tensor, got {type(got).__name__}")


def _compare(got, want: torch.Tensor, what: str, atol: float = 1e-4, rtol: float = 1e-4, slips=None,
             nonfinite: str = "log of a zero probability?") -> None:
    """Fail unless ``got`` equals ``want`` within tolerance. ``slips``: ``{message: value or callable}``, the
    answers a designed slip gives; a wrong ``got`` that matches one is failed with its message."""
    got = _as_tensor(got, what)
    want = want.detach().double()

    def named() -> str:
        for message, value in (slips or {}).items():
            value = value() if callable(value) else value
            if value is not None and _close(got, torch.as_tensor(value), max(atol, 1e-6), max(rtol, 1e-6)):
                return f": {message}"
        return ""

    if tuple(got.shape) != tuple(want.shape):
        raise AssertionError(f"{what}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}{named()}")
    got = got.detach().double()
    if not torch.isfinite(got).all():
        raise AssertionError(f"{what}: the result holds NaN or inf ({nonfinite})")
    error = (got - want).abs().max().item()
    scale = want.abs().max().item()
    if error > atol + rtol * scale:
        raise AssertionError(f"{what}: off by up to {error:.3g} (values up to {scale:.3g}){named()}")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- 1. the logit lens of one row -------------------------------------------------------------------------

def _layer_output(model, input_ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw output of decoder block ``layer`` (before the final norm), read with a forward hook."""
    seen = {}

    def keep(module, args, output):
        seen["h"] = output[0] if isinstance(output, tuple) else output

    handle = model.model.layers[layer].register_forward_hook(keep)
    try:
        with torch.no_grad():
            logits = model(input_ids).logits
    finally:
        handle.remove()
    return seen["h"], logits


def check_logit_lens(logit_lens, model=None, input_ids=None) -> bool:
    """``logit_lens(resid [..., d_model], final_norm, W_U [vocab, d_model], b_U [vocab] or None) -> [..., vocab]``:
    the logits of residual vectors decoded through the final norm and the unembedding."""
    names = "resid, final_norm, W_U, b_U"
    g = _generator(0)
    d_model, vocab = 16, 37
    norm = torch.nn.LayerNorm(d_model)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(d_model, generator=g))
        norm.bias.copy_(torch.randn(d_model, generator=g))
    W_U, b_U = torch.randn(vocab, d_model, generator=g), torch.randn(vocab, generator=g)
    resid = 5 * torch.randn(2, 3, d_model, generator=g) + 2
    with torch.no_grad():
        normed = norm(resid).double()
        want = normed @ W_U.double().T + b_U.double()
        slips = {"did you add `b_U`? (the unembedding bias, when it is not None)": want - b_U.double(),
                 "did you apply the final norm before the unembedding?": resid.double() @ W_U.double().T + b_U.double(),
                 "did you drop the norm's bias? (call the final norm module itself; a LayerNorm has a bias)":
                     (normed - norm.bias.double()) @ W_U.double().T + b_U.double(),
                 "did you add `b_U` twice?": want + b_U.double()}
        what = "LayerNorm decoder with an unembedding bias"
        _compare(_call(what, logit_lens, names, resid, norm, W_U, b_U), want, what, slips=slips)
        what = "one vector [d_model], b_U=None"
        _compare(_call(what, logit_lens, names, resid[0, 0], norm, W_U, None), want[0, 0] - b_U.double(), what,
                 slips={"did you add `b_U`? (the unembedding bias, when it is not None)": want[0, 0]})
    if model is not None:
        n = model.config.num_hidden_layers
        for layer in (n // 2, n - 1):
            resid, logits = _layer_output(model, input_ids, layer)
            what = f"the real model, output of block {layer}"
            with torch.no_grad():
                got = _call(what, logit_lens, names, resid[0], model.model.norm, model.lm_head.weight, None)
                want = model.model.norm(resid[0]).double() @ model.lm_head.weight.double().T
            _compare(got, want, what, atol=1e-3)
            if layer == n - 1:  # the last block's output decoded is the model's own output
                _compare(got, logits[0].double(), "the last block's output must give the model's own logits", atol=1e-3)
    return True


# --- 2. the rows of the lens: every block's input, and the last block's output -----------------------------

def _reference_rows(model, input_ids: torch.Tensor) -> dict:
    """Every block's input (embed, 1_pre, ...) and every block's raw output, by hooks, and the normed output."""
    inputs, outputs = [], []

    def keep_input(module, args, kwargs):
        inputs.append((args[0] if args else kwargs["hidden_states"])[0].detach())

    def keep_output(module, args, output):
        outputs.append((output[0] if isinstance(output, tuple) else output)[0].detach())

    handles = [b.register_forward_pre_hook(keep_input, with_kwargs=True) for b in model.model.layers]
    handles += [b.register_forward_hook(keep_output) for b in model.model.layers]
    try:
        with torch.no_grad():
            logits = model(input_ids).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    return {"inputs": torch.stack(inputs), "outputs": torch.stack(outputs), "logits": logits}


def check_block_inputs(block_inputs, model, input_ids) -> bool:
    """``block_inputs(model, input_ids [1, pos]) -> [n_layers + 1, pos, d_model]``: the rows the logit lens
    decodes, in order: the input of every block (``embed`` = the input of block 0, then ``1_pre`` ...
    ``{n-1}_pre``), then the last block's raw output (``{n-1}_post``, before the final norm)."""
    ref = _reference_rows(model, input_ids)
    want = torch.cat([ref["inputs"], ref["outputs"][-1:]])
    what = "the rows of the lens on the real model"
    got = _call(what, block_inputs, "model, input_ids", model, input_ids)
    with torch.no_grad():
        normed_last = model.model.norm(ref["outputs"][-1])
    slips = {
        "the last row is after the final norm: Hugging Face's `hidden_states[-1]` is normed; the lens needs the "
        "last block's raw output (a forward hook on the last block)": torch.cat([ref["inputs"], normed_last[None]]),
        "you kept only the blocks' inputs: add the last block's output as the final row": ref["inputs"],
        "you kept only the blocks' outputs: the first row is the embeddings (the input of block 0)": ref["outputs"],
        "drop the batch axis: return [rows, pos, d_model]": want[:, None],
    }
    _compare(got, want, what, atol=1e-4, rtol=1e-4, slips=slips)
    return True


# --- 3. entropy --------------------------------------------------------------------------------------------

def _logit_cases() -> list[tuple[str, torch.Tensor]]:
    g = _generator(1)
    extreme = torch.randn(3, 50, generator=g) * 3
    extreme[:, 10:] = -1e4  # probabilities that underflow to exactly 0 in float32
    return [
        ("random logits of shape [4, 7, 50]", torch.randn(4, 7, 50, generator=g) * 4),
        ("logits with probabilities that underflow to 0", extreme),
        ("uniform logits (entropy ln 50)", torch.zeros(2, 50)),
    ]


def _entropy(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=dim)
    return -(logp.exp() * logp).sum(dim)


def check_entropy(entropy) -> bool:
    """``entropy(logits [..., vocab]) -> [...]``: the entropy in nats of ``softmax(logits)`` over the last axis."""
    for what, logits in _logit_cases():
        want = _entropy(logits)
        slips = {"bits instead of nats? (use the natural log)": want / math.log(2),
                 "a missing minus sign? (entropy is -sum p log p, never negative)": -want,
                 "softmax over the wrong axis? (the vocabulary is the last axis)":
                     lambda logits=logits: -(logits.double().softmax(0) * logits.double().log_softmax(0)).sum(-1)}
        got = _call(what, entropy, "logits", logits)
        _compare(got, want, what, slips=slips,
                 nonfinite="p * log(p) at an underflowed p = 0 gives 0 * -inf = NaN: use log_softmax")
    return True


# --- 4. KL divergence --------------------------------------------------------------------------------------

def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    logp, logq = torch.log_softmax(p_logits.double(), dim), torch.log_softmax(q_logits.double(), dim)
    return (logp.exp() * (logp - logq)).sum(dim)


def check_kl(kl) -> bool:
    """``kl(final_logits, row_logits) -> [...]``: KL(final || row) in nats, the divergence of the row's
    distribution from the final one (the tuned-lens loss), over the last axis."""
    g = _generator(2)
    final = torch.randn(4, 7, 50, generator=g) * 3
    row = torch.randn(4, 7, 50, generator=g)
    peaked = torch.zeros(2, 50)
    peaked[:, 0] = 12.0  # sharp vs flat: KL(sharp || flat) is far from KL(flat || sharp)
    cases = [("random logits of shape [4, 7, 50]", final, row), ("a sharp final row vs a flat row", peaked,
             torch.zeros(2, 50)), ("a row equal to the final row (KL 0)", final, final)]
    for what, p_logits, q_logits in cases:
        want = _kl(p_logits, q_logits)
        slips = {"the wrong way round? KL(final || row) takes the expectation under the final distribution":
                     _kl(q_logits, p_logits),
                 "bits instead of nats? (use the natural log)": want / math.log(2),
                 "softmax over the wrong axis? (the vocabulary is the last axis)":
                     lambda p=p_logits, q=q_logits: (p.double().softmax(0) * (
                         p.double().log_softmax(0) - q.double().log_softmax(0))).sum(-1)}
        got = _call(what, kl, "final_logits, row_logits", p_logits, q_logits)
        _compare(got, want, what, slips=slips)
    return True


# --- 5. a head's direct logit attribution -----------------------------------------------------------------

def _reference_dla(z, W_O, final_resid, norm_weight, eps, W_U, target, distractor) -> torch.Tensor:
    scale = (final_resid.double().pow(2).mean() + eps).sqrt()  # RMSNorm's scale, frozen at the real forward pass
    direction = norm_weight.double() * (W_U[target].double() - W_U[distractor].double())
    return (z.double() @ W_O.double()) / scale @ direction


def check_head_dla(head_dla) -> bool:
    """``head_dla(z [d_head], W_O [d_head, d_model], final_resid [d_model], norm_weight [d_model], eps, W_U
    [vocab, d_model], target, distractor) -> float``: what one attention head writes, ``z @ W_O``, read through
    the final RMSNorm (its scale frozen at ``final_resid``'s) and the unembedding, as a target-minus-distractor
    logit."""
    names = "z, W_O, final_resid, norm_weight, eps, W_U, target, distractor"
    g = _generator(3)
    n_heads, d_head, d_model, vocab, eps = 4, 8, 24, 40, 1e-5
    z = torch.randn(n_heads, d_head, generator=g)
    W_O = torch.randn(n_heads, d_head, d_model, generator=g)
    rest = 30 * torch.randn(d_model, generator=g)  # everything else in the stream: a scale far from 1
    final = rest + torch.einsum("hd,hdm->m", z, W_O)
    norm_weight = 1 + 0.3 * torch.randn(d_model, generator=g)
    W_U = torch.randn(vocab, d_model, generator=g)
    target, distractor = 7, 19
    got = []
    for h in range(n_heads):
        what = f"head {h}"
        args = (z[h], W_O[h], final, norm_weight, eps, W_U, target, distractor)
        value = _as_tensor(_call(what, head_dla, names, *args), what)
        value = value.double().reshape(()) if value.numel() == 1 else value
        want = _reference_dla(*args)
        write = z[h] @ W_O[h]
        slips = {
            "did you divide by the final norm's frozen scale, sqrt(mean(final_resid²) + eps)?":
                (write.double() * norm_weight.double()) @ (W_U[target] - W_U[distractor]).double(),
            "did you multiply by the final norm's weight?": _reference_dla(*args[:3], torch.ones(d_model), *args[4:]),
            "the norm's scale is frozen at the whole final residual, not at the head's own write":
                _reference_dla(z[h], W_O[h], write, norm_weight, eps, W_U, target, distractor),
            "target minus distractor, not the other way round": -want,
        }
        _compare(value, want, what, atol=1e-4, slips=slips)
        got.append(value)
    # the heads plus the rest add up to the logit difference the normed final residual gives
    normed = final.double() / (final.double().pow(2).mean() + eps).sqrt() * norm_weight.double()
    total = normed @ (W_U[target].double() - W_U[distractor].double())
    rest_part = _reference_dla(torch.ones(1), rest[None], final, norm_weight, eps, W_U, target, distractor)
    _compare(torch.stack(got).sum() + rest_part, total, "heads + rest = the logit difference", atol=1e-4)
    return True


# --- 6. a Patchscope ----------------------------------------------------------------------------------------

def _reference_patchscope(model, source_ids, layer, position, target_ids, write_position) -> torch.Tensor:
    """The target's logits at every position ``[t, vocab]`` with the state entering block ``layer`` at the
    source's ``position`` written at the target's ``write_position``, entering the same block."""
    seen = {}

    def read(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen["h"] = hidden[0, position].clone()

    def write(module, args, kwargs):
        if args:
            hidden = args[0].clone()
            hidden[0, write_position] = seen["h"]
            return (hidden, *args[1:]), kwargs
        hidden = kwargs["hidden_states"].clone()
        hidden[0, write_position] = seen["h"]
        return args, {**kwargs, "hidden_states": hidden}

    block = model.model.layers[layer]
    with torch.no_grad():
        handle = block.register_forward_pre_hook(read, with_kwargs=True)
        try:
            model(source_ids)
        finally:
            handle.remove()
        handle = block.register_forward_pre_hook(write, with_kwargs=True)
        try:
            return model(target_ids).logits[0]
        finally:
            handle.remove()


def _patchscope_slips(model, source, layer, position, target, target_position) -> dict:
    """The answers of the designed slips, each computed only when a wrong answer is being named."""
    n = model.config.num_hidden_layers
    ref = lambda *a: _reference_patchscope(model, *a)
    slips = {
        "you ignored `position`: read the source at `position`, not at its last token":
            lambda: ref(source, layer, -1, target, target_position)[target_position],
        "you ignored `target_position` for the write: write the state at `target_position` (a write at the "
        "last token cannot change an earlier position)": lambda: ref(source, layer, position, target, -1)[target_position],
        "return the logits at `target_position`, not at the last token":
            lambda: ref(source, layer, position, target, target_position)[-1],
        "one block too late: the state entering block `layer` is the output of block `layer - 1` (a forward "
        "*pre*-hook on block `layer`)": (lambda: ref(source, layer + 1, position, target, target_position)[target_position])
        if layer + 1 < n else None,
        "one block too early: hook block `layer` itself, not `layer - 1`":
            (lambda: ref(source, layer - 1, position, target, target_position)[target_position]) if layer > 0 else None,
    }
    return {message: value for message, value in slips.items() if value is not None}


def check_patchscope(patchscope, model, tokenizer) -> bool:
    """``patchscope(model, source_ids [1, s], layer, position, target_ids [1, t], target_position) -> [vocab]``:
    the target's next-token logits at ``target_position`` when the hidden state *entering* block ``layer`` at
    ``position`` of the source replaces the one entering block ``layer`` at ``target_position`` of the target."""
    names = "model, source_ids, layer, position, target_ids, target_position"
    source = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    target = tokenizer("cat->cat; 1135->1135; hello->hello; ?", return_tensors="pt")["input_ids"]
    n = model.config.num_hidden_layers
    s_last, t_last = source.shape[1] - 1, target.shape[1] - 1
    what = "patching a prompt into itself must give the model's own logits"
    with torch.no_grad():
        own = model(source).logits[0, -1]
        got = _call(what, patchscope, names, model, source, n // 2, s_last, source, s_last)
    _compare(got, own.double(), what, atol=1e-3)
    # (layer, source position, target position): the last tokens, then non-final ones on both sides, where a
    # Patchscope that ignores `position` or `target_position` gives another answer
    cases = [(n // 3, s_last, t_last, "source ' is' into the identity prompt's '?'"),
             (2 * n // 3, s_last, t_last, "source ' is' into the identity prompt's '?'"),
             (n // 2, s_last - 1, t_last - 2, "a non-final source token into a non-final target token")]
    for layer, position, target_position, story in cases:
        what = f"{story}, layer {layer}, position {position}, target_position {target_position}"
        want = _reference_patchscope(model, source, layer, position, target, target_position)[target_position]
        with torch.no_grad():
            got = _call(what, patchscope, names, model, source, layer, position, target, target_position)
        _compare(got, want.double(), what, atol=1e-3,
                 slips=_patchscope_slips(model, source, layer, position, target, target_position))
    return True


# --- 7. surfaced, then overridden ---------------------------------------------------------------------------

OUTCOMES = ("kept", "overridden", "top_k", "never")
_SURFACED_FIELDS = ("outcome", "first_top1", "first_top_k", "peak_row", "lost_row", "overrider")


def _first(mask: torch.Tensor) -> int:
    hits = mask.nonzero()
    return int(hits[0]) if len(hits) else -1


def _reference_surfaced(row_logits: torch.Tensor, target: int, k: int, slip: str | None = None) -> dict:
    """Where ``target`` surfaced in ``row_logits [row, vocab]``; ``slip`` gives one designed wrong answer."""
    logits = row_logits.double()
    larger = (logits > logits[:, target:target + 1]).sum(-1)
    rank = larger if slip == "zero_based" else 1 + larger
    top1 = rank == 1
    in_k = rank < k if slip == "strict_k" else rank <= k
    if slip == "top_k_as_top1":
        top1 = in_k
    peak_of = logits[:, target] if slip == "peak_logit" else logits.softmax(-1)[:, target]
    kept = bool(top1[-1])
    overridden = bool(top1.any()) and not kept
    last = len(top1) - 1 - _first(top1.flip(0)) if top1.any() else -1
    if slip == "first_loss":  # the first row after a top-1 row that is not top-1
        lost = next((r for r in range(1, len(top1)) if top1[r - 1] and not top1[r]), -1)
    else:
        lost = last if slip == "lost_at_last_top1" else last + 1
    lost = lost if overridden else -1
    if slip == "overrider_final":
        overrider = int(logits[-1].argmax()) if overridden else -1
    else:
        overrider = int(logits[lost].argmax()) if overridden else -1
    if slip == "outcome_any_loss":
        outcome = "overridden" if top1.any() and not top1[_first(top1):].all() else "kept" if kept else \
            "top_k" if in_k.any() else "never"
    else:
        outcome = "kept" if kept else "overridden" if overridden else "top_k" if in_k.any() else "never"
    return {"first_top1": _first(top1), "first_top_k": _first(in_k), "peak_row": int(peak_of.argmax()),
            "lost_row": lost, "overrider": overrider, "outcome": outcome}


_SURFACED_SLIPS = {
    "zero_based": "a rank counts from 1: rank = 1 + the number of strictly larger logits",
    "strict_k": "in the top-k means rank <= k, not rank < k",
    "top_k_as_top1": "top-1 and top-k mixed up: top-1 means rank 1",
    "peak_logit": "the peak is of the target's probability (softmax over the row), not of its raw logit",
    "first_loss": "the row where it was lost is the one after its *last* top-1 row (it is never top-1 again), "
                  "not the first dip",
    "lost_at_last_top1": "off by one row: the target is lost at the row *after* its last top-1 row",
    "overrider_final": "the overrider is the top-1 at the row where the target was lost, not the final top-1",
    "outcome_any_loss": "`kept` is decided by the final row alone: a target that dips and comes back is kept",
}


def _rows_with_ranks(spec: list[tuple[float, dict[int, float]]], vocab: int, target: int) -> torch.Tensor:
    """Row logits from ``(target logit, {token: logit})`` per row; every other token gets 0."""
    rows = torch.zeros(len(spec), vocab)
    for r, (target_logit, others) in enumerate(spec):
        rows[r, target] = target_logit
        for token, value in others.items():
            rows[r, token] = value
    return rows


def _surfaced_cases() -> list[tuple[str, torch.Tensor, int, int]]:
    v, t = 8, 0
    # overridden: in the top-2 at row 1, top-1 at row 2 by a hair (its logit's peak, a low probability), lost at
    # row 3, top-1 again at rows 4-5 (row 4: its probability's peak), lost for good at row 6 to token 4, while the
    # final top-1 is token 1
    overridden = _rows_with_ranks([
        (0.0, {1: 3, 2: 3, 3: 3, 4: 3, 5: 3}), (2.0, {3: 2.5}), (5.0, {1: 4.9, 2: 4.9, 3: 4.9, 4: 4.9, 5: 4.9}),
        (2.0, {3: 3.0}), (4.0, {}), (2.5, {4: 2.0}), (2.0, {4: 3.0, 1: 2.5}), (2.0, {1: 4.0, 2: 3.0})], v, t)
    # kept: top-1 at row 1, below at rows 2-3, top-1 from row 4 to the end
    kept = _rows_with_ranks([(0.0, {2: 1}), (3.0, {}), (1.0, {2: 2}), (1.0, {5: 2, 6: 1.5}), (3.0, {2: 1}),
                             (4.0, {}), (5.0, {})], v, t)
    # top_k with k = 3: rank 4 at row 2, rank exactly 3 at row 4, never top-1
    top_k = _rows_with_ranks([(0.0, {1: 1, 2: 1, 3: 1, 4: 1}), (0.5, {1: 1, 2: 1, 3: 1, 4: 1}),
                              (1.0, {1: 2, 2: 2, 3: 2}), (0.5, {1: 1, 2: 1, 3: 1, 4: 1}), (1.0, {1: 2, 2: 2}),
                              (0.5, {1: 2, 2: 2, 3: 1, 4: 1})], v, t)
    never = _rows_with_ranks([(0.0, {1: 1, 2: 1, 3: 1}), (0.2, {1: 1, 2: 1, 3: 1}), (0.1, {1: 2, 2: 1, 3: 1})], v, t)
    return [("overridden after a dip (k=2)", overridden, t, 2), ("dips and comes back (k=2)", kept, t, 2),
            ("in the top-3 at one row, never top-1 (k=3)", top_k, t, 3), ("never in the top-3 (k=3)", never, t, 3)]


def check_surfaced(surfaced) -> bool:
    """``surfaced(row_logits [row, vocab], target, k) -> dict``: for one position's lens rows, the first row
    where ``target`` is top-1 (``first_top1``) and in the top-k (``first_top_k``), the row of its highest
    probability (``peak_row``), for an overridden target the row after its last top-1 row (``lost_row``) and
    the top-1 token there (``overrider``), and the ``outcome``: ``kept`` (the last row's top-1), ``overridden``
    (top-1 somewhere, not at the end), ``top_k`` (in the top-k somewhere, never top-1) or ``never``. Rows are
    indices; -1 where there is no such row."""
    for what, rows, target, k in _surfaced_cases():
        want = _reference_surfaced(rows, target, k)
        got = _call(what, surfaced, "row_logits, target, k", rows, target, k)
        if not isinstance(got, dict):
            raise AssertionError(f"{what}: expected a dict with keys {_SURFACED_FIELDS}, got {type(got).__name__}")  # noqa: TRY004
        missing = [f for f in _SURFACED_FIELDS if f not in got]
        if missing:
            raise AssertionError(f"{what}: the dict lacks {missing}")
        got = {field: got[field] if field == "outcome" else int(got[field]) for field in _SURFACED_FIELDS}
        if got == want:
            continue
        slips = {message: _reference_surfaced(rows, target, k, slip) for slip, message in _SURFACED_SLIPS.items()}
        field = next(f for f in _SURFACED_FIELDS if got[f] != want[f])
        # of the slips that give this wrong field, the one agreeing with the most of the answer
        agree = {m: sum(answer[f] == got[f] for f in _SURFACED_FIELDS) for m, answer in slips.items()
                 if answer[field] == got[field]}
        named = sorted(agree, key=lambda m: -agree[m])
        raise AssertionError(f"{what}: {field} should be {want[field]!r}, got {got[field]!r}"
                             + (f": {named[0]}" if named else ""))
    return True


# --- 8. a linear shortcut, and early exit ------------------------------------------------------------------

def _lstsq(src: torch.Tensor, dst: torch.Tensor, intercept: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [d_src, d_dst], b [d_dst])`` minimising ``|src @ W + b - dst|²`` (float64)."""
    src, dst = src.double(), dst.double()
    X = torch.cat([src, torch.ones(len(src), 1, dtype=src.dtype)], 1) if intercept else src
    solution = torch.linalg.lstsq(X, dst).solution
    return (solution[:-1], solution[-1]) if intercept else (solution, torch.zeros(dst.shape[1], dtype=dst.dtype))


def _precision(W, b, src, dst, decode) -> float:
    return (decode(src.double() @ W + b).argmax(-1) == decode(dst.double()).argmax(-1)).double().mean().item()


def _shortcut_data():
    g = _generator(5)
    d, vocab, n_fit, n_test = 12, 30, 40, 400
    W_true = torch.eye(d) + 0.6 * torch.randn(d, d, generator=g)
    b_true = 2 * torch.randn(d, generator=g)
    W_U = torch.randn(vocab, d, generator=g)

    def pairs(n):
        src = torch.randn(n, d, generator=g)
        return src, src @ W_true + b_true + 0.8 * torch.randn(n, d, generator=g)

    return pairs(n_fit), pairs(n_test), W_U.double()


def check_shortcut(shortcut) -> bool:
    """``shortcut(fit_src [n, d], fit_dst [n, d], test_src [m, d], test_dst [m, d], decode) -> (W [d, d], b [d],
    precision)``: the least-squares affine map ``dst ≈ src @ W + b`` fitted on the fit pairs, and its
    precision@1 on the held-out test pairs: the share of them where ``decode(src @ W + b)`` and ``decode(dst)``
    (logits) have the same top-1."""
    (fit_src, fit_dst), (test_src, test_dst), W_U = _shortcut_data()
    decode = lambda h: h.double() @ W_U.T  # stands for the final norm and the unembedding
    what = "a planted affine map plus noise, 40 fit pairs, 400 held-out pairs"
    got = _call(what, shortcut, "fit_src, fit_dst, test_src, test_dst, decode", fit_src, fit_dst, test_src, test_dst,
                decode)
    if not isinstance(got, tuple) or len(got) != 3:
        raise AssertionError(f"{what}: expected a tuple (W, b, precision), got {describe(got)}")
    W, b, precision = got
    want_W, want_b = _lstsq(fit_src, fit_dst)
    held_W, held_b = _lstsq(test_src, test_dst)
    none_W, _ = _lstsq(fit_src, fit_dst, intercept=False)
    _compare(W, want_W, f"{what}: W", atol=1e-3, rtol=1e-3, slips={
        "you fitted on the held-out pairs: fit on (fit_src, fit_dst), score on (test_src, test_dst)": held_W,
        "W is transposed: the map is src @ W + b, W of shape [d_src, d_dst]": want_W.T,
        "no intercept: append a column of ones to src (or centre both) so that b is fitted too": none_W})
    _compare(b, want_b, f"{what}: b", atol=1e-3, rtol=1e-3, slips={
        "you fitted on the held-out pairs: fit on (fit_src, fit_dst), score on (test_src, test_dst)": held_b})
    want = _precision(want_W, want_b, test_src, test_dst, decode)
    slips = {
        "precision on the fit pairs: score on the held-out (test) pairs": _precision(want_W, want_b, fit_src, fit_dst, decode),
        "did you apply your map before decoding? that is the identity's precision":
            _precision(torch.eye(fit_src.shape[1], dtype=torch.float64), 0, test_src, test_dst, decode),
        "a count, not a share: divide by the number of test pairs": want * len(test_src),
    }
    # one test pair may flip between float32 and float64 arithmetic at a near-tie: allow it
    _compare(_as_tensor(precision, f"{what}: precision").double().reshape(()), torch.tensor(want),
             f"{what}: precision", atol=1.5 / len(test_src), rtol=0, slips=slips)
    return True


def _reference_exit(confidence, agrees, blocks_run, threshold, slip=None):
    """``(exit_row [token], retention, layers_saved)``; ``slip`` gives one designed wrong answer."""
    if slip == "direction":
        confident = confidence <= threshold
    elif slip == "strict":
        confident = confidence > threshold
    else:
        confident = confidence >= threshold
    if slip != "no_last_row":
        confident = confident.clone()
        confident[-1] = True
    if slip == "last_confident":
        flipped = confident.flip(0).int().argmax(0)
        exit_row = len(confident) - 1 - flipped
    else:
        exit_row = confident.int().argmax(0)
    tokens = torch.arange(confidence.shape[1])
    retention = agrees[exit_row, tokens].double().mean().item()
    n_layers = int(blocks_run[-1])
    if slip == "row_index":
        saved = ((len(blocks_run) - 1 - exit_row).double() / (len(blocks_run) - 1)).mean().item()
    else:
        saved = ((n_layers - blocks_run[exit_row]).double() / n_layers).mean().item()
    if slip == "count":
        saved = (n_layers - blocks_run[exit_row]).double().mean().item()
    return exit_row, retention, saved


_EXIT_SLIPS = {
    "direction": "the threshold's direction: exit once the top-1 probability is *at least* the threshold",
    "strict": "at least the threshold: a confidence equal to the threshold exits (>=, not >)",
    "no_last_row": "a token that is never confident exits at the last row (argmax of an all-False mask is 0)",
    "last_confident": "exit at the *first* confident row, not the last",
    "row_index": "layers saved counts blocks not run (`blocks_run`), not rows: the rows need not be evenly spaced",
    "count": "layers saved is a share of the model's blocks (divide by blocks_run[-1]), not a count",
}


def check_early_exit(early_exit) -> bool:
    """``early_exit(confidence [row, token], agrees [row, token] bool, blocks_run [row] int, threshold) ->
    (exit_row [token], retention, layers_saved)``: each token exits at the first row whose confidence (top-1
    probability) is at least ``threshold``, the last row if none; ``retention`` is the share of tokens whose
    exit row agrees with the model's final top-1; ``layers_saved`` the mean share of the model's
    ``blocks_run[-1]`` blocks that were not run (a row's ``blocks_run``: 0 for embed, l for l_pre, l + 1 for
    l_post)."""
    # rows embed, 2_pre, 5_pre, 9_pre, 11_post of a 12-block model (thinned, unevenly); 6 tokens
    blocks_run = torch.tensor([0, 2, 5, 9, 12])
    confidence = torch.tensor([[0.10, 0.20, 0.05, 0.50, 0.10, 0.30],
                               [0.30, 0.75, 0.10, 0.20, 0.20, 0.20],
                               [0.80, 0.40, 0.20, 0.60, 0.30, 0.75],
                               [0.90, 0.90, 0.30, 0.95, 0.40, 0.10],
                               [0.95, 0.95, 0.40, 0.97, 0.50, 0.90]])
    agrees = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 1, 0, 1, 0, 0], [1, 1, 0, 1, 0, 0],
                           [1, 1, 0, 1, 0, 1], [1, 1, 1, 1, 1, 1]]).bool()
    for threshold in (0.75, 0.5):
        what = f"5 rows (blocks run {blocks_run.tolist()}), 6 tokens, threshold {threshold}"
        got = _call(what, early_exit, "confidence, agrees, blocks_run, threshold", confidence, agrees, blocks_run,
                    threshold)
        if not isinstance(got, tuple) or len(got) != 3:
            raise AssertionError(f"{what}: expected a tuple (exit_row, retention, layers_saved), got {describe(got)}")
        want = _reference_exit(confidence, agrees, blocks_run, threshold)
        for index, field in enumerate(("exit_row", "retention", "layers_saved")):
            value = _as_tensor(got[index], f"{what}: {field}")
            reference = torch.as_tensor(want[index]).double()
            slips = {message: torch.as_tensor(_reference_exit(confidence, agrees, blocks_run, threshold, slip)[index])
                     for slip, message in _EXIT_SLIPS.items()}
            _compare(value.reshape(reference.shape) if value.numel() == reference.numel() else value, reference,
                     f"{what}: {field}", atol=1e-6, rtol=1e-6, slips=slips)
    return True


# --- the quiz -----------------------------------------------------------------------------------------------

QUIZ_PROMPT = "The capital of France is"
QUIZ_SENTENCE = "The logit lens decodes each layer's residual stream through the model's final norm and unembedding."
QUIZ_IDENTITY = "cat->cat; 1135->1135; hello->hello; ?"


class _Quiz:
    """The quiz's answers, computed with plain torch on the model, each when first asked for."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.cache = model, tokenizer, {}
        self.n = model.config.num_hidden_layers
        self.ids = tokenizer(QUIZ_PROMPT, return_tensors="pt")["input_ids"]  # the model's own tokenization
        self.paris = tokenizer.encode(" Paris", add_special_tokens=False)[0]
        self.london = tokenizer.encode(" London", add_special_tokens=False)[0]

    def labels(self) -> list[str]:
        return ["embed"] + [f"{l}_pre" for l in range(1, self.n)] + [f"{self.n - 1}_post"]

    def rows(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        ref = _reference_rows(self.model, ids)
        return torch.cat([ref["inputs"], ref["outputs"][-1:]]), ref["logits"]

    def lens(self, rows):
        with torch.no_grad():
            return self.model.lm_head(self.model.model.norm(rows)).double()

    def first_paris(self, ids) -> str:
        rows, _ = self.rows(ids)
        top1 = self.lens(rows[:, -1]).argmax(-1)
        return self.labels()[_first(top1 == self.paris)]

    def with_bos(self) -> torch.Tensor | None:
        bos = self.tokenizer.bos_token_id
        return None if bos is None else torch.cat([torch.tensor([[bos]]), self.ids], 1)

    def head_dla(self) -> tuple[str, float, float]:
        """The best head, its DLA, and the same without the norm's frozen scale (a slip)."""
        model, heads = self.model, self.model.config.num_attention_heads
        d_head = model.config.hidden_size // heads
        z = []
        hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: z.append(a[0][0, -1].detach()))
                 for layer in model.model.layers]
        try:
            rows, _ = self.rows(self.ids)
        finally:
            for h in hooks:
                h.remove()
        norm, W_U = model.model.norm, model.lm_head.weight.detach()
        final = rows[-1, -1]
        scale = (final.double().pow(2).mean() + norm.variance_epsilon).sqrt()
        direction = norm.weight.detach().double() * (W_U[self.paris] - W_U[self.london]).double()
        values = torch.zeros(self.n, heads, dtype=torch.float64)
        for L, layer in enumerate(model.model.layers):
            W_O = layer.self_attn.o_proj.weight.detach().double()  # [d_model, heads * d_head]
            for h in range(heads):
                values[L, h] = (z[L][h * d_head:(h + 1) * d_head].double() @ W_O[:, h * d_head:(h + 1) * d_head].T) @ direction
        L, h = divmod(int(values.argmax()), heads)
        return f"L{L}H{h}", (values / scale).max().item(), values.max().item()

    def patch_first(self) -> int | None:
        target = self.tokenizer(QUIZ_IDENTITY, return_tensors="pt")["input_ids"]
        for L in range(self.n):
            logits = _reference_patchscope(self.model, self.ids, L, self.ids.shape[1] - 1, target, target.shape[1] - 1)
            if int(logits[-1].argmax()) == self.paris:
                return L
        return None

    def answer(self, q: int):
        if q not in self.cache:
            self.cache[q] = getattr(self, f"q{q}")()
        return self.cache[q]

    def q1(self):
        return self.n + 1

    def q2(self):
        return math.log(self.model.config.vocab_size)

    def q3(self):
        return self.first_paris(self.ids)

    def q4(self):
        return _entropy(self.rows(self.ids)[1][-1]).item()

    def q5(self):
        rows, logits = self.rows(self.ids)
        return _kl(logits[-1], self.lens(rows[0, -1])).item()

    def q6(self):
        logits = self.rows(self.ids)[1][-1]
        return (logits[self.paris] - logits[self.london]).item()

    def q7(self):
        return self.head_dla()

    def q8(self):
        W = self.model.lm_head.weight
        return W.numel(), W.data_ptr() == self.model.model.embed_tokens.weight.data_ptr()

    def q9(self):
        ids = self.tokenizer(QUIZ_SENTENCE, return_tensors="pt")["input_ids"]
        rows, _ = self.rows(ids)
        return (self.lens(rows[0]).argmax(-1) == ids[0]).double().mean().item()

    def q10(self):
        L = self.patch_first()
        return None if L is None else f"{L}_pre"


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _near(value, want: float, rel: float = 1e-2, abs_: float = 1e-2) -> bool:
    value = _number(value)
    return value is not None and math.isclose(value, want, rel_tol=rel, abs_tol=abs_)


def _row_label(value, quiz: _Quiz) -> str | None:
    """A row given as its label ("29_post") or its index into the rows (30)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and 0 <= value <= quiz.n:
        return quiz.labels()[value]
    return None


def _mark(q: int, given, quiz: _Quiz) -> tuple[bool, str | None, str]:
    """``(correct, slip, why)`` for question ``q``: ``slip`` names the likely mistake of a wrong answer (or is
    ``None``); ``why`` explains the right answer (shown only once it is answered correctly)."""
    want = quiz.answer(q)
    if q == 1:
        slip = (f"{quiz.n} is the number of blocks; the rows are embed, 1_pre ... {quiz.n - 1}_pre and "
                f"{quiz.n - 1}_post: one more") if given == quiz.n else None
        return given == want, slip, f"the input of each of the {quiz.n} blocks, plus the last block's output"
    if q == 2:
        slip = "bits instead of nats? (the natural log)" if _near(given, want / math.log(2)) else None
        return _near(given, want, 1e-3), slip, (f"ln(vocab) = ln {quiz.model.config.vocab_size}: the entropy of the "
                                                "uniform distribution")
    if q == 3:
        label, slip = _row_label(given, quiz), None
        bos = quiz.with_bos()
        if label != want and bos is not None and label == quiz.first_paris(bos):
            slip = ("that is the answer with a BOS prepended (TransformerLens's `to_tokens` default); the quiz "
                    "tokenizes as `tokenizer(prompt)` does, which for SmolLM2 adds no BOS")
        elif isinstance(given, int) and given + 1 <= quiz.n and quiz.labels()[given + 1] == want:
            slip = "off by one row: the rows count from embed = 0"
        tokens = quiz.tokenizer.convert_ids_to_tokens(quiz.ids[0].tolist())
        return label == want, slip, (f"tokenized as `tokenizer(prompt)`: {len(tokens)} tokens {tokens}, no BOS, as in "
                                     "tutorial 01; \" Paris\" leads only in the last rows: the answer is computed late")
    if q in (4, 5, 6):
        slip = None
        if q in (4, 5) and _near(given, want / math.log(2)):
            slip = "bits instead of nats? (the natural log)"
        if q == 5:
            rows, logits = quiz.rows(quiz.ids)
            if _near(given, _kl(quiz.lens(rows[0, -1]), logits[-1]).item()):
                slip = "the wrong way round: KL(final || row) is an expectation under the final distribution"
        if q == 6 and _near(given, -want):
            slip = "\" Paris\" minus \" London\", not the other way round"
        why = {4: "the model is fairly sure of \" Paris\"",
               5: "the embeddings row mostly predicts the input token itself, far from the output",
               6: "the same as the log-prob difference (the normaliser cancels)"}[q]
        return _near(given, want), slip, why
    if q == 7:
        head, value, unscaled = want
        if not (isinstance(given, (tuple, list)) and len(given) == 2):
            return False, 'answer as ("L{layer}H{head}", value)', ""
        slip = ("the head is right; its size needs the final norm's frozen scale"
                if given[0] == head and _near(given[1], unscaled) else None)
        return given[0] == head and _near(given[1], value), slip, "one late head writes much of the difference"
    if q == 8:
        if not (isinstance(given, (tuple, list)) and len(given) == 2):
            return False, "answer as (number of parameters, shared: True/False)", ""
        slip = "a tied matrix is one set of parameters, counted once" if given[0] == 2 * want[0] else None
        return tuple(given) == tuple(want), slip, (f"vocab x d_model; {'tied to' if want[1] else 'separate from'} "
                                                   "the token embedding")
    if q == 9:
        return _near(given, want, 1e-3, 1e-3), None, ("the embeddings row decodes each token's own embedding "
                                                      "through the (tied) unembedding, so it ranks that token first")
    if q == 10:
        label, slip = _row_label(given, quiz), None
        if (want is not None and label is not None and label.endswith("_pre") and label[:-4].isdigit()
                and abs(int(label[:-4]) - int(want[:-4])) == 1):
            slip = "one block off: the row is the state *entering* block L"
        return label == want, slip, ("the Patchscope reads \" Paris\" from the middle of the stack, earlier than "
                                     "the logit lens does (question 3)")
    raise AssertionError(f"there is no question {q}")


def check_quiz(answers: dict, model, tokenizer) -> dict:
    """Mark ``answers`` (question number -> your answer; ``None`` or absent: not answered) and print a line
    per question: correct with why, wrong with the likely slip (the answer is not given away), or not
    answered. Returns ``{question: True/False/None}``. Prompts are tokenized as ``tokenizer(prompt)`` does."""
    quiz, marks = _Quiz(model, tokenizer), {}
    for q in range(1, 11):
        given = answers.get(q)
        if given is None:
            marks[q] = None
            print(f"Q{q:>2}: not answered")
            continue
        try:
            correct, slip, why = _mark(q, given, quiz)
        except Exception as error:  # noqa: BLE001 -- an answer of an unexpected type must not crash the marking
            correct, slip, why = False, f"could not read {given!r} ({type(error).__name__}: {error})", ""
        marks[q] = correct
        if correct:
            print(f"Q{q:>2}: correct, {given!r}: {why}")
        else:
            print(f"Q{q:>2}: WRONG, {given!r}" + (f": {slip}" if slip else " (no designed slip matches: try again)"))
    done = [m for m in marks.values() if m is not None]
    print(f"quiz: {sum(done)}/{len(done)} answered correctly")
    return marks


# --- running a check in the exercises notebook ----------------------------------------------------------

def run(check, function, *args) -> str:
    """Run ``check(function, *args)`` and say how it went, without raising: "passed", "not done yet" (the
    function still raises ``NotImplementedError``) or "FAILED: why" (a wrong answer, naming the likely slip,
    or an error your function raised, with the case's input shapes)."""
    try:
        check(function, *args)
    except NotImplementedError:
        verdict = "not done yet"
    except AssertionError as error:
        verdict = f"FAILED: {error}"
    except Exception as error:  # noqa: BLE001 -- reading an answer of an unexpected kind must not crash the notebook
        verdict = f"FAILED: the check could not read your answer: {type(error).__name__}: {error}"
    else:
        verdict = "passed"
    print(f"{check.__name__}: {verdict}")
    return verdict
