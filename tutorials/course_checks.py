"""Checks for the course exercises (``07_exercises.ipynb``; worked answers in ``07_solutions.ipynb``).

Each ``check_*`` calls your function on cases whose answers it computes itself, with plain torch and, where a
model is needed, a Hugging Face Llama-family causal LM (the course uses SmolLM2-135M). It raises
``AssertionError`` saying which case failed and how, and returns ``True`` when every case passes. Nothing here
imports lens_plugins: the checks must not share code, or mistakes, with the package they teach.

The cases are built so that the usual slips fail: a decoder with a LayerNorm bias and an unembedding bias
(forgetting either fails), logits that are not square and hold very negative values (softmax over the wrong
axis, or ``p * log p`` at ``p = 0``, fails), an asymmetric pair of distributions (KL the wrong way round fails),
a final residual far from unit scale (forgetting the final norm's frozen scale fails), and a Patchscope
compared at a layer where writing one block too early or too late changes the answer.
"""

import torch

__all__ = ["check_logit_lens", "check_entropy", "check_kl", "check_head_dla", "check_patchscope", "run"]


def _compare(got, want: torch.Tensor, what: str, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    assert isinstance(got, torch.Tensor), f"{what}: expected a torch.Tensor, got {type(got).__name__}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}"
    got = got.detach().to(torch.float64)
    assert torch.isfinite(got).all(), f"{what}: the result holds NaN or inf (log of a zero probability?)"
    error = (got - want.to(torch.float64)).abs().max().item()
    scale = want.abs().max().item()
    assert error <= atol + rtol * scale, f"{what}: off by up to {error:.3g} (values up to {scale:.3g})"


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- 1. the logit lens of one row -------------------------------------------------------------------------

def _layer_output(model, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
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
    g = _generator(0)
    d_model, vocab = 16, 37
    norm = torch.nn.LayerNorm(d_model)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(d_model, generator=g))
        norm.bias.copy_(torch.randn(d_model, generator=g))
    W_U, b_U = torch.randn(vocab, d_model, generator=g), torch.randn(vocab, generator=g)
    resid = 5 * torch.randn(2, 3, d_model, generator=g) + 2
    with torch.no_grad():
        want = norm(resid).double() @ W_U.double().T + b_U.double()
        _compare(logit_lens(resid, norm, W_U, b_U), want, "LayerNorm decoder with an unembedding bias")
        _compare(logit_lens(resid[0, 0], norm, W_U, None), want[0, 0] - b_U.double(), "one vector, b_U=None")
    if model is not None:
        n = model.config.num_hidden_layers
        for layer in (n // 2, n - 1):
            resid, logits = _layer_output(model, input_ids, layer)
            with torch.no_grad():
                got = logit_lens(resid[0], model.model.norm, model.lm_head.weight, None)
                want = model.model.norm(resid[0]).double() @ model.lm_head.weight.double().T
            _compare(got, want, f"the real model, output of block {layer}", atol=1e-3)
            if layer == n - 1:  # the last block's output decoded is the model's own output
                _compare(got, logits[0].double(), "the last block's output must give the model's own logits", atol=1e-3)
    return True


# --- 2. entropy --------------------------------------------------------------------------------------------

def _logit_cases() -> list[tuple[str, torch.Tensor]]:
    g = _generator(1)
    extreme = torch.randn(3, 50, generator=g) * 3
    extreme[:, 10:] = -1e4  # probabilities that underflow to exactly 0 in float32
    return [
        ("random logits of shape [4, 7, 50]", torch.randn(4, 7, 50, generator=g) * 4),
        ("logits with probabilities that underflow to 0", extreme),
        ("uniform logits (entropy ln 50)", torch.zeros(2, 50)),
    ]


def check_entropy(entropy) -> bool:
    """``entropy(logits [..., vocab]) -> [...]``: the entropy in nats of ``softmax(logits)`` over the last axis."""
    for what, logits in _logit_cases():
        logp = torch.log_softmax(logits.double(), dim=-1)
        want = -(logp.exp() * logp).sum(-1)
        _compare(entropy(logits), want, what)
    return True


# --- 3. KL divergence --------------------------------------------------------------------------------------

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
        logp, logq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
        want = (logp.exp() * (logp - logq)).sum(-1)
        _compare(kl(p_logits, q_logits), want, what)
    return True


# --- 4. a head's direct logit attribution -----------------------------------------------------------------

def _reference_dla(z, W_O, final_resid, norm_weight, eps, W_U, target, distractor) -> torch.Tensor:
    scale = (final_resid.double().pow(2).mean() + eps).sqrt()  # RMSNorm's scale, frozen at the real forward pass
    direction = norm_weight.double() * (W_U[target].double() - W_U[distractor].double())
    return (z.double() @ W_O.double()) / scale @ direction


def check_head_dla(head_dla) -> bool:
    """``head_dla(z [d_head], W_O [d_head, d_model], final_resid [d_model], norm_weight [d_model], eps, W_U
    [vocab, d_model], target, distractor) -> float``: what one attention head writes, ``z @ W_O``, read through
    the final RMSNorm (its scale frozen at ``final_resid``'s) and the unembedding, as a target-minus-distractor
    logit."""
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
        value = head_dla(z[h], W_O[h], final, norm_weight, eps, W_U, target, distractor)
        value = torch.as_tensor(value, dtype=torch.float64).reshape(())
        want = _reference_dla(z[h], W_O[h], final, norm_weight, eps, W_U, target, distractor)
        _compare(value, want, f"head {h}", atol=1e-4)
        got.append(value)
    # the heads plus the rest add up to the logit difference the normed final residual gives
    normed = final.double() / (final.double().pow(2).mean() + eps).sqrt() * norm_weight.double()
    total = normed @ (W_U[target].double() - W_U[distractor].double())
    rest_part = _reference_dla(torch.ones(1), rest[None], final, norm_weight, eps, W_U, target, distractor)
    _compare(torch.stack(got).sum() + rest_part, total, "heads + rest = the logit difference", atol=1e-4)
    return True


# --- 5. a Patchscope ----------------------------------------------------------------------------------------

def _reference_patchscope(model, source_ids, layer, position, target_ids, target_position) -> torch.Tensor:
    seen = {}

    def read(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen["h"] = hidden[0, position].clone()

    def write(module, args, kwargs):
        if args:
            hidden = args[0].clone()
            hidden[0, target_position] = seen["h"]
            return (hidden, *args[1:]), kwargs
        hidden = kwargs["hidden_states"].clone()
        hidden[0, target_position] = seen["h"]
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
            return model(target_ids).logits[0, target_position]
        finally:
            handle.remove()


def check_patchscope(patchscope, model, tokenizer) -> bool:
    """``patchscope(model, source_ids [1, s], layer, position, target_ids [1, t], target_position) -> [vocab]``:
    the target's next-token logits at ``target_position`` when the hidden state *entering* block ``layer`` at
    ``position`` of the source replaces the one entering block ``layer`` at ``target_position`` of the target."""
    source = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    target = tokenizer("cat->cat; 1135->1135; hello->hello; ?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        own = model(source).logits[0, -1]
        got = patchscope(model, source, model.config.num_hidden_layers // 2, source.shape[1] - 1, source, source.shape[1] - 1)
    _compare(got, own.double(), "patching a prompt into itself must give the model's own logits", atol=1e-3)
    n = model.config.num_hidden_layers
    for layer in (n // 3, 2 * n // 3):
        want = _reference_patchscope(model, source, layer, source.shape[1] - 1, target, target.shape[1] - 1)
        with torch.no_grad():
            got = patchscope(model, source, layer, source.shape[1] - 1, target, target.shape[1] - 1)
        _compare(got, want.double(), f"source ' is' at the input of block {layer} into the identity prompt's '?'",
                 atol=1e-3)
    return True


# --- running a check in the exercises notebook ----------------------------------------------------------

def run(check, function, *args) -> str:
    """Run ``check(function, *args)`` and say how it went, without raising: "passed", "not done yet" (the
    function still raises ``NotImplementedError``) or "FAILED: why"."""
    try:
        check(function, *args)
    except NotImplementedError:
        verdict = "not done yet"
    except AssertionError as error:
        verdict = f"FAILED: {error}"
    else:
        verdict = "passed"
    print(f"{check.__name__}: {verdict}")
    return verdict

