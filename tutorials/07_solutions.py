# %% [markdown]
# # 07 · Course exercises: solutions
#
# Worked answers to `07_exercises.ipynb`, checked by `tutorials/course_checks.py` (plain torch and
# transformers, no lens_plugins, so the checks share no code with the package). Each exercise prints the output
# that `07_exercises` shows as its expected output. Then: plausible wrong answers, and the checks failing them by
# name; and the quiz, every answer computed here, marked by `check_quiz` (which computes its own) and, where the
# package computes the same thing by another path, checked against lens_plugins.
#
# **Setup** (from the repository root): `make venv`, then open this notebook with the `.venv` kernel
# (e.g. `.venv/bin/pip install jupyterlab && .venv/bin/jupyter lab tutorials/`), started in `tutorials/`
# or with `tutorials/` on `PYTHONPATH` so that `import course_checks` works.

# %%
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

import course_checks as cc
from lens_plugins.models import default_model_dir, load_hf_model

model, tokenizer = load_hf_model(default_model_dir())   # SmolLM2-135M as a Hugging Face LlamaForCausalLM
prompt = "The capital of France is"
input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]   # the model's own tokenization: no BOS
n_layers = model.config.num_hidden_layers
labels = ["embed"] + [f"{l}_pre" for l in range(1, n_layers)] + [f"{n_layers - 1}_post"]
print(n_layers, "layers;", input_ids.shape[1], "tokens:", tokenizer.convert_ids_to_tokens(input_ids[0]))

# %% [markdown]
# ## Exercise 1: the logit lens of one row
#
# Decode residual vectors through the final norm and the unembedding (and its bias, if any). The last block's
# output decoded this way is exactly the model's output.

# %%
def logit_lens(resid: Float[Tensor, "... d_model"], final_norm: torch.nn.Module, W_U: Float[Tensor, "vocab d_model"],
               b_U: Float[Tensor, " vocab"] | None = None) -> Float[Tensor, "... vocab"]:
    logits = final_norm(resid) @ W_U.T
    return logits if b_U is None else logits + b_U


assert cc.check_logit_lens(logit_lens, model, input_ids)

# %% [markdown]
# ## Exercise 2: the rows of the lens
#
# Forward pre-hooks on every block see its input (`embed` is the input of block 0); a forward hook on the last
# block sees its raw output (Hugging Face's `hidden_states[-1]` is already through the final norm).

# %%
def block_inputs(model, input_ids: Int[Tensor, "1 pos"]) -> Float[Tensor, "row pos d_model"]:
    rows = []
    hooks = [block.register_forward_pre_hook(lambda m, args: rows.append(args[0][0])) for block in model.model.layers]
    hooks.append(model.model.layers[-1].register_forward_hook(
        lambda m, args, out: rows.append((out[0] if isinstance(out, tuple) else out)[0])))
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(rows)


assert cc.check_block_inputs(block_inputs, model, input_ids)
rows = block_inputs(model, input_ids)
with torch.no_grad():
    row_logits = logit_lens(rows, model.model.norm, model.lm_head.weight)   # [row, pos, vocab]
probs = row_logits[:, -1].softmax(-1)
print("rows:", tuple(rows.shape))
for r in (0, 10, 20, 27, 28, 29, 30):
    p, token = probs[r].max(-1)
    print(f"{labels[r]:>8}  top-1 {tokenizer.decode([int(token)])!r:12} {p.item():.2f}")

# %% [markdown]
# ## Exercise 3: entropy, in nats
#
# Over the vocabulary (the last axis), from `log_softmax`, which never takes the log of an underflowed 0.

# %%
def entropy(logits: Float[Tensor, "... vocab"]) -> Float[Tensor, "..."]:
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


assert cc.check_entropy(entropy)

# %% [markdown]
# ## Exercise 4: KL(final ‖ row)
#
# The divergence of a row's distribution from the final one: expectations under the *final* distribution.

# %%
def kl(final_logits: Float[Tensor, "... vocab"], row_logits: Float[Tensor, "... vocab"]) -> Float[Tensor, "..."]:
    logp = torch.log_softmax(final_logits.double(), dim=-1)
    logq = torch.log_softmax(row_logits.double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


assert cc.check_kl(kl)
for r in (0, 10, 20, 27, 28, 29, 30):
    print(f"{labels[r]:>8}  entropy {entropy(row_logits[r, -1]).item():5.2f}  "
          f"KL(final||row) {kl(row_logits[-1, -1], row_logits[r, -1]).item():6.2f}")

# %% [markdown]
# ## Exercise 5: a head's direct logit attribution
#
# The head writes `z @ W_O` into the residual stream. The final RMSNorm divides the whole stream by one scale,
# frozen at its value on the real forward pass, then multiplies by its weight; the unembedding turns the result
# into logits. So the head's share of `logit[target] − logit[distractor]` is linear in what it writes.

# %%
def head_dla(z: Float[Tensor, " d_head"], W_O: Float[Tensor, "d_head d_model"], final_resid: Float[Tensor, " d_model"],
             norm_weight: Float[Tensor, " d_model"], eps: float, W_U: Float[Tensor, "vocab d_model"], target: int,
             distractor: int) -> Float[Tensor, ""]:
    scale = (final_resid.pow(2).mean() + eps).sqrt()
    return ((z @ W_O) / scale * norm_weight) @ (W_U[target] - W_U[distractor])


assert cc.check_head_dla(head_dla)

# %% [markdown]
# ## Exercise 6: a Patchscope
#
# Read the hidden state entering block `layer` at `position` of the source; run the target with that state
# written at the input of block `layer`, at `target_position`; return the target's logits there. Forward
# pre-hooks on the decoder block do both (transformers 5 passes the hidden states as the first argument).

# %%
def patchscope(model, source_ids: Int[Tensor, "1 s"], layer: int, position: int, target_ids: Int[Tensor, "1 t"],
               target_position: int) -> Float[Tensor, " vocab"]:
    block, saved = model.model.layers[layer], {}

    def read(module, args):
        saved["h"] = args[0][0, position].clone()

    def write(module, args):
        hidden = args[0].clone()
        hidden[0, target_position] = saved["h"]
        return (hidden, *args[1:])

    with torch.no_grad():
        for hook, ids in ((read, source_ids), (write, target_ids)):
            handle = block.register_forward_pre_hook(hook)
            try:
                logits = model(ids).logits
            finally:
                handle.remove()
    return logits[0, target_position]


assert cc.check_patchscope(patchscope, model, tokenizer)
identity = tokenizer("cat->cat; 1135->1135; hello->hello; ?", return_tensors="pt")["input_ids"]
for layer in (8, 16, 24, 28):   # what the identity prompt says about ' France' (position 3, not the last)
    probs = patchscope(model, input_ids, layer, 3, identity, identity.shape[1] - 1).softmax(-1)
    top = probs.topk(2)
    print(f"' France' entering block {layer:>2} -> " + "  ".join(
        f"{tokenizer.decode([int(t)])!r} {p:.2f}" for p, t in zip(top.values.tolist(), top.indices)))

# %% [markdown]
# ## Exercise 7: surfaced, then overridden
#
# Ranks are `1 +` the number of strictly larger logits, so the tests "top-1" and "in the top-k" are exact.
# The target is lost at the row *after* its last top-1 row, and the overrider is that row's top-1.

# %%
def surfaced(row_logits: Float[Tensor, "row vocab"], target: int, k: int) -> dict:
    rank = 1 + (row_logits > row_logits[:, target, None]).sum(-1)
    top1, in_k = rank == 1, rank <= k

    def first(mask):
        return int(mask.nonzero()[0]) if mask.any() else -1

    kept = bool(top1[-1])
    overridden = bool(top1.any()) and not kept
    lost_row = int(top1.nonzero()[-1]) + 1 if overridden else -1
    return {"first_top1": first(top1), "first_top_k": first(in_k),
            "peak_row": int(row_logits.softmax(-1)[:, target].argmax()), "lost_row": lost_row,
            "overrider": int(row_logits[lost_row].argmax()) if overridden else -1,
            "outcome": "kept" if kept else "overridden" if overridden else "top_k" if in_k.any() else "never"}


assert cc.check_surfaced(surfaced)
sentence = "The logit lens decodes each layer's residual stream through the model's final norm and unembedding."
sentence_ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
sentence_rows = block_inputs(model, sentence_ids)
with torch.no_grad():
    sentence_logits = logit_lens(sentence_rows, model.model.norm, model.lm_head.weight)
found = [surfaced(sentence_logits[:, p], int(sentence_ids[0, p + 1]), 5) for p in range(sentence_ids.shape[1] - 1)]
print({o: sum(f["outcome"] == o for f in found) for o in cc.OUTCOMES}, "of", len(found), "next tokens")
for p, f in enumerate(found):
    if f["outcome"] == "overridden":
        print(f"after {tokenizer.decode(sentence_ids[0, :p + 1])!r}: {tokenizer.decode(sentence_ids[0, p + 1])!r} "
              f"top-1 from {labels[f['first_top1']]}, lost at {labels[f['lost_row']]} to "
              f"{tokenizer.decode([f['overrider']])!r}")

# %% [markdown]
# ## Exercise 8: a linear shortcut, and early exit
#
# The fit: least squares with a column of ones appended (the intercept), on the fit pairs only; the score, on the
# held-out pairs. Early exit: the first row at least as confident as the threshold, the last row if none.

# %%
def shortcut(fit_src: Float[Tensor, "n d"], fit_dst: Float[Tensor, "n d"], test_src: Float[Tensor, "m d"],
             test_dst: Float[Tensor, "m d"], decode) -> tuple[Float[Tensor, "d d"], Float[Tensor, " d"], float]:
    X = torch.cat([fit_src, torch.ones(len(fit_src), 1, dtype=fit_src.dtype)], 1)
    solution = torch.linalg.lstsq(X.double(), fit_dst.double()).solution
    W, b = solution[:-1], solution[-1]
    hits = decode(test_src.double() @ W + b).argmax(-1) == decode(test_dst).argmax(-1)
    return W, b, hits.double().mean().item()


def early_exit(confidence: Float[Tensor, "row token"], agrees: Bool[Tensor, "row token"], blocks_run: Int[Tensor, " row"],
               threshold: float) -> tuple[Int[Tensor, " token"], float, float]:
    confident = confidence >= threshold
    confident[-1] = True
    exit_row = confident.int().argmax(0)
    retention = agrees[exit_row, torch.arange(confidence.shape[1])].double().mean().item()
    n = int(blocks_run[-1])
    return exit_row, retention, ((n - blocks_run[exit_row]).double() / n).mean().item()


assert cc.check_shortcut(shortcut) and cc.check_early_exit(early_exit)

# %% [markdown]
# On SmolLM2: a shortcut from `15_pre` to the last row, fitted on 12 documents of the Python manual
# (`pydoc_data.topics`) and scored on 4 others; then early exit through the plain logit lens on one held-out
# document, checked against `lp.early_exit`. Through the logit lens the embeddings row is confidently the *input*
# token (question 9), so with every row allowed almost every token exits there, wrong: an exit has to start
# after the first blocks.

# %%
from pydoc_data.topics import topics

docs = [" ".join(topics[key].split())[:600] for key in sorted(topics)]
decode = lambda h: model.lm_head(model.model.norm(h.float())).double()


def pairs(texts, row):
    src, dst = [], []
    for text in texts:
        r = block_inputs(model, tokenizer(text, return_tensors="pt")["input_ids"])
        src.append(r[row]), dst.append(r[-1])
    return torch.cat(src), torch.cat(dst)


(fit_src, fit_dst), (test_src, test_dst) = pairs(docs[0:60:5], 15), pairs(docs[60:76:4], 15)
with torch.no_grad():
    W, b, precision = shortcut(fit_src, fit_dst, test_src, test_dst, decode)
    identity_precision = (decode(test_src).argmax(-1) == decode(test_dst).argmax(-1)).double().mean().item()
print(f"15_pre -> 29_post on {len(test_src)} held-out tokens ({len(fit_src)} fit): precision@1 shortcut "
      f"{precision:.2f}, identity (logit lens) {identity_precision:.2f}")

held = docs[77]
held_ids = tokenizer(held, return_tensors="pt")["input_ids"]
with torch.no_grad():
    held_logits = logit_lens(block_inputs(model, held_ids), model.model.norm, model.lm_head.weight)
confidence = held_logits.softmax(-1).amax(-1)                         # [row, token]
agrees = held_logits.argmax(-1) == held_logits[-1].argmax(-1)
blocks_run = torch.tensor(list(range(n_layers)) + [n_layers])         # embed: 0, l_pre: l, 29_post: 30
for first in (0, 15):   # every row, then only from 15_pre on (rows may be thinned: blocks_run says how)
    for threshold in (0.5, 0.9):
        _, retention, saved = early_exit(confidence[first:], agrees[first:], blocks_run[first:], threshold)
        print(f"rows from {labels[first]}, threshold {threshold}: retention {retention:.2f}, "
              f"layers saved {saved:.1%} on {held_ids.shape[1]} tokens")

# %%
import lens_plugins as lp

wrapped = lp.nnsight.wrap_model(model, tokenizer)
kwargs = dict(top_k=1, reductions=["top_k", "entropy", "final_top1"])
for first in (0, 15):   # lp.early_exit on the package's lens of the same text, all rows and from 15_pre on
    curve = lp.early_exit(lp.nnsight.run_logit_lens(wrapped, held, layers=labels[first:], **kwargs), [0.5, 0.9])
    for i, threshold in enumerate((0.5, 0.9)):
        _, retention, saved = early_exit(confidence[first:], agrees[first:], blocks_run[first:], threshold)
        assert abs(curve.retention[i] - retention) < 1e-6 and abs(curve.layers_saved[i] - saved) < 1e-6

# %% [markdown]
# ## Plausible wrong answers fail, by name
#
# Each is one slip away from a solution above; each check must reject it and say which slip it looks like.
# (`tests/test_tutorials.py` runs many more.)

# %%
wrong = {
    "logit lens without the final norm": (cc.check_logit_lens, lambda r, n, W, b=None: r @ W.T + (0 if b is None else b)),
    "logit lens without the unembedding bias": (cc.check_logit_lens, lambda r, n, W, b=None: n(r) @ W.T),
    "entropy in bits": (cc.check_entropy, lambda l: entropy(l) / torch.log(torch.tensor(2.0))),
    "entropy as p * log p after softmax": (cc.check_entropy, lambda l: -(l.softmax(-1) * l.softmax(-1).log()).sum(-1)),
    "KL the wrong way round, KL(row || final)": (cc.check_kl, lambda p, q: kl(q, p)),
    "head DLA without the norm's scale": (
        cc.check_head_dla, lambda z, W_O, f, w, eps, W_U, t, d: ((z @ W_O) * w) @ (W_U[t] - W_U[d])),
    "surfaced: the overrider is the final top-1": (cc.check_surfaced, lambda l, t, k: {
        **surfaced(l, t, k), "overrider": int(l[-1].argmax()) if surfaced(l, t, k)["outcome"] == "overridden" else -1}),
    "shortcut fitted on the held-out pairs": (cc.check_shortcut, lambda fs, fd, ts, td, dec: shortcut(ts, td, ts, td, dec)),
    "early exit strictly above the threshold": (   # no case's confidence lies in (t, t + 1e-3]: this is `>`
        cc.check_early_exit, lambda c, a, b, t: early_exit(c, a, b, t + 1e-3)),
    "logit lens with W_U not transposed (raises)": (cc.check_logit_lens, lambda r, n, W, b=None: n(r) @ W),
}
for name, (check, answer) in wrong.items():
    verdict = cc.run(check, answer)
    assert verdict.startswith("FAILED"), name

# a Patchscope that ignores `position` (always reads the source's last token) fails at a non-final position
def patchscope_last_only(model, source_ids, layer, position, target_ids, target_position):
    return patchscope(model, source_ids, layer, -1, target_ids, target_position)


assert "ignored `position`" in cc.run(cc.check_patchscope, patchscope_last_only, model, tokenizer)

# %% [markdown]
# ## Quiz: answers
#
# The questions are in `07_exercises.ipynb`. Every number is computed here with the functions above; `check_quiz`
# marks them against its own plain-torch answers, and where lens_plugins computes the same quantity (through its
# streamed readout, a different code path), the answer is checked against it too.

# %%
import math

paris, london = tokenizer.encode(" Paris")[0], tokenizer.encode(" London")[0]
reference = lp.nnsight.run_logit_lens(wrapped, prompt, targets=[" Paris"])
answers = {}

# Q1: how many rows does the logit lens of SmolLM2-135M decode?
answers[1] = rows.shape[0]
assert answers[1] == len(reference.labels) == n_layers + 1

# Q2: the largest entropy any row can have, in nats?
answers[2] = entropy(torch.zeros(model.config.vocab_size)).item()
assert math.isclose(answers[2], math.log(model.config.vocab_size), rel_tol=1e-9)

# Q3: the first row whose top-1 at the last position is " Paris", the prompt tokenized as `tokenizer(prompt)` (no
# BOS), as in tutorial 01 ("29_post"). With a BOS, prepend_bos=True, it is "28_pre".
top1 = row_logits[:, -1].argmax(-1)
answers[3] = labels[int((top1 == paris).nonzero()[0])]
assert answers[3] == reference.labels[int((reference.rank_of(" Paris")[:, 0, -1] == 1).nonzero()[0])] == "29_post"
with_bos = lp.nnsight.run_logit_lens(wrapped, prompt, targets=[" Paris"], prepend_bos=True)
assert with_bos.labels[int((with_bos.rank_of(" Paris")[:, 0, -1] == 1).nonzero()[0])] == "28_pre"

# Q4: the entropy of the model's own next-token distribution after the prompt, in nats?
answers[4] = entropy(row_logits[-1, -1]).item()
assert abs(answers[4] - reference.entropy[-1, 0, -1].item()) < 1e-3

# Q5: KL(final || embeddings row) at the last position, in nats?
answers[5] = kl(row_logits[-1, -1], row_logits[0, -1]).item()
assert abs(answers[5] - reference.kl_final_row[0, 0, -1].item()) < 1e-2 * max(1.0, answers[5])

# Q6: the model's logit difference " Paris" - " London" after the prompt?
answers[6] = (row_logits[-1, -1, paris] - row_logits[-1, -1, london]).item()

# Q7: which head has the largest direct logit attribution to " Paris" - " London", and how large?
heads, d_head = model.config.num_attention_heads, model.config.head_dim
z_in = []
hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: z_in.append(a[0][0, -1])) for layer in model.model.layers]
with torch.no_grad():
    model(input_ids)
for h in hooks:
    h.remove()
norm = model.model.norm
dla = torch.tensor([[head_dla(z_in[L][h * d_head:(h + 1) * d_head],
                              model.model.layers[L].self_attn.o_proj.weight[:, h * d_head:(h + 1) * d_head].T,
                              rows[-1, -1], norm.weight, norm.variance_epsilon, model.lm_head.weight, paris, london).item()
                     for h in range(heads)] for L in range(n_layers)])
best = divmod(int(dla.argmax()), heads)
answers[7] = (f"L{best[0]}H{best[1]}", dla.max().item())
package = lp.nnsight.run_attribution(wrapped, prompt, " Paris", " London", by="head").top(1)[0]
assert package[0] == answers[7][0] and abs(package[1] - answers[7][1]) < 1e-3

# Q8: how many parameters does the unembedding hold, and are they the embedding's?
answers[8] = (model.lm_head.weight.numel(), model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())
assert answers[8][0] == model.config.vocab_size * model.config.hidden_size

# Q9: at what share of a sentence's positions does the embeddings row rank the input token itself first?
answers[9] = (sentence_logits[0].argmax(-1) == sentence_ids[0]).float().mean().item()
package = lp.nnsight.run_logit_lens(wrapped, sentence, reductions=["input_token"]).input_token_rank[0, 0]
assert answers[9] == (package == 1).float().mean().item()

# Q10: the first block whose input, patched from the prompt's last position into the identity prompt's "?",
# makes the model say " Paris"?
says = [patchscope(model, input_ids, L, -1, identity, -1).argmax().item() == paris for L in range(n_layers)]
answers[10] = f"{says.index(True)}_pre" if True in says else None
scope = lp.patchscope(wrapped, prompt, positions=[-1], targets=[" Paris"])
assert answers[10] == scope.labels[int((scope.rank_of(" Paris")[:, 0, -1] == 1).nonzero()[0])]

# %% [markdown]
# `check_quiz` computes every answer again, its own way (plain torch), and marks these:

# %%
marks = cc.check_quiz(answers, model, tokenizer)
assert all(marks.values())

# %% [markdown]
# Wrong answers that a designed slip explains are named (the right answer is not given away):

# %%
slips = {2: math.log2(model.config.vocab_size), 3: "28_pre", 5: kl(row_logits[0, -1], row_logits[-1, -1]).item()}
marks = cc.check_quiz(slips, model, tokenizer)
assert [marks[q] for q in slips] == [False] * len(slips)
