# %% [markdown]
# # 07 · Course exercises: the logit lens and its family from scratch
#
# Eight functions to write with plain torch on SmolLM2-135M (a Hugging Face `LlamaForCausalLM`), then a
# ten-question quiz. About 2 h 30 in all; each exercise states its time budget. For each one:
#
# - the stub is typed (jaxtyping: `Float[Tensor, "row pos d_model"]` is a float tensor of that shape); replace its
#   `raise NotImplementedError` with your code and re-run the cell;
# - the check from `tutorials/course_checks.py` prints `passed`, `not done yet`, or `FAILED: why`: the case that
#   failed and, when your answer matches a slip the check was designed to catch, that slip ("did you add `b_U`?",
#   "bits instead of nats?"); an error your function raises is shown with the case's input shapes;
# - two hints, opened one at a time (click "Hint 1"), when you are stuck past the time budget;
# - once it passes, the cell prints what your function says on the real model; compare with the **expected
#   output** below it (`07_solutions` prints the same lines).
#
# The checks compute their own answers with plain torch and never import lens_plugins, so they cannot share a
# mistake with the package. Worked answers: `07_solutions.ipynb`.
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
print("final norm:", model.model.norm, "| unembedding:", model.lm_head)

# %% [markdown]
# ## Exercise 1: the logit lens of one row (⏱ 10 min)
#
# `logit_lens(resid, final_norm, W_U, b_U=None)`: `resid` is `[..., d_model]` (residual vectors: one row of
# the lens), `final_norm` the model's final norm module, `W_U` the unembedding `[vocab, d_model]`, `b_U` its
# bias or `None`. Return the logits `[..., vocab]` the model would produce if it stopped there. The check also
# decodes the real model's last block output, which must give the model's own logits.
#
# <details><summary>Hint 1</summary>
#
# The model's own head is `logits = lm_head(norm(h_last))`; the lens applies the same two steps to any row.
# </details>
# <details><summary>Hint 2</summary>
#
# `final_norm(resid) @ W_U.T`, plus `b_U` when it is not `None` (SmolLM2 has none; the check's toy decoder has one).
# </details>

# %%
def logit_lens(resid: Float[Tensor, "... d_model"], final_norm: torch.nn.Module, W_U: Float[Tensor, "vocab d_model"],
               b_U: Float[Tensor, " vocab"] | None = None) -> Float[Tensor, "... vocab"]:
    raise NotImplementedError("your code here")


cc.run(cc.check_logit_lens, logit_lens, model, input_ids)

# %% [markdown]
# ## Exercise 2: the rows of the lens (⏱ 15 min)
#
# `block_inputs(model, input_ids)`: the rows every later exercise and the quiz decode, `[n_layers + 1, pos,
# d_model]`, in order: the input of every block (`embed` is the input of block 0, then `1_pre` ... `29_pre`),
# then the last block's raw output (`29_post`, before the final norm). The cell then decodes them with your
# `logit_lens` and prints the top-1 at the last position of a few rows.
#
# <details><summary>Hint 1</summary>
#
# `block.register_forward_pre_hook(fn)` calls `fn(module, args)` with the block's inputs (`args[0]` is the hidden
# state `[1, pos, d_model]`); `register_forward_hook(fn)` calls `fn(module, args, output)`. Remove the hooks after.
# </details>
# <details><summary>Hint 2</summary>
#
# Hugging Face's `output_hidden_states=True` gives `n_layers + 1` states, but the last one is already through the
# final norm, so decoding it would apply the norm twice: take the last row from a forward hook on the last block
# (its output may be a tuple: take `[0]`).
# </details>

# %%
def block_inputs(model, input_ids: Int[Tensor, "1 pos"]) -> Float[Tensor, "row pos d_model"]:
    raise NotImplementedError("your code here")


if cc.run(cc.check_block_inputs, block_inputs, model, input_ids) == "passed":
    rows = block_inputs(model, input_ids)
    with torch.no_grad():
        row_logits = logit_lens(rows, model.model.norm, model.lm_head.weight)   # [row, pos, vocab]
    probs = row_logits[:, -1].softmax(-1)
    print("rows:", tuple(rows.shape))
    for r in (0, 10, 20, 27, 28, 29, 30):
        p, token = probs[r].max(-1)
        print(f"{labels[r]:>8}  top-1 {tokenizer.decode([int(token)])!r:12} {p.item():.2f}")

# %% [markdown]
# **Expected output**
#
# ```text
# rows: (31, 5, 576)
#    embed  top-1 ' is'        1.00
#   10_pre  top-1 '.'          0.80
#   20_pre  top-1 ' '          0.98
#   27_pre  top-1 ' the'       0.60
#   28_pre  top-1 ' the'       0.67
#   29_pre  top-1 ' capital'   0.20
#  29_post  top-1 ' Paris'     0.77
# ```

# %% [markdown]
# ## Exercise 3: entropy (⏱ 5 min)
#
# `entropy(logits)`: the entropy in nats of the distribution `softmax(logits)` over the last axis (the
# vocabulary), for logits of any leading shape. Some of the check's probabilities underflow to exactly 0.
#
# <details><summary>Hint 1</summary>
#
# H = −Σ p log p, with the natural log. What is `0 * log(0)` in floating point?
# </details>
# <details><summary>Hint 2</summary>
#
# `logp = torch.log_softmax(logits, -1)`, then `-(logp.exp() * logp).sum(-1)`: `log_softmax` never takes the log of 0.
# </details>

# %%
def entropy(logits: Float[Tensor, "... vocab"]) -> Float[Tensor, "..."]:
    raise NotImplementedError("your code here")


cc.run(cc.check_entropy, entropy)

# %% [markdown]
# ## Exercise 4: KL divergence from the final row (⏱ 5 min)
#
# `kl(final_logits, row_logits)`: KL(final ‖ row) in nats over the last axis: how far a lens row's
# distribution is from the model's final one, the quantity a tuned lens is trained to minimise. The cell then
# prints both measures at the last position of a few rows.
#
# <details><summary>Hint 1</summary>
#
# KL(P ‖ Q) = Σ P (log P − log Q): the expectation is under P, here the final distribution.
# </details>
# <details><summary>Hint 2</summary>
#
# Two `log_softmax`es over the last axis, then `(logp.exp() * (logp - logq)).sum(-1)`.
# </details>

# %%
def kl(final_logits: Float[Tensor, "... vocab"], row_logits: Float[Tensor, "... vocab"]) -> Float[Tensor, "..."]:
    raise NotImplementedError("your code here")


if cc.run(cc.check_kl, kl) == "passed" and cc.run(cc.check_entropy, entropy) == "passed" and "row_logits" in globals():
    for r in (0, 10, 20, 27, 28, 29, 30):
        print(f"{labels[r]:>8}  entropy {entropy(row_logits[r, -1]).item():5.2f}  "
              f"KL(final||row) {kl(row_logits[-1, -1], row_logits[r, -1]).item():6.2f}")

# %% [markdown]
# **Expected output**
#
# ```text
#    embed  entropy  0.00  KL(final||row) 106.84
#   10_pre  entropy  0.69  KL(final||row)  28.94
#   20_pre  entropy  0.13  KL(final||row)  30.34
#   27_pre  entropy  1.24  KL(final||row)   6.57
#   28_pre  entropy  1.84  KL(final||row)   3.46
#   29_pre  entropy  4.37  KL(final||row)   1.81
#  29_post  entropy  1.48  KL(final||row)   0.00
# ```

# %% [markdown]
# ## Exercise 5: one head's direct logit attribution (⏱ 15 min)
#
# `head_dla(z, W_O, final_resid, norm_weight, eps, W_U, target, distractor)`: attention head `h` writes
# `z @ W_O` into the residual stream (`z`: its `[d_head]` output at one position, `W_O`: its `[d_head, d_model]`
# slice of the output projection). Return its contribution to `logit[target] − logit[distractor]` through the
# final RMSNorm, whose scale `sqrt(mean(final_resid²) + eps)` is frozen at its value on the real forward pass,
# and whose weight is `norm_weight`, then the unembedding `W_U`.
#
# <details><summary>Hint 1</summary>
#
# With the scale frozen, the norm is linear: `RMSNorm(x) = x / scale * weight`, so each head's share is the norm
# and unembedding applied to what that head alone writes.
# </details>
# <details><summary>Hint 2</summary>
#
# `((z @ W_O) / scale * norm_weight) @ (W_U[target] - W_U[distractor])`, with `scale` from `final_resid` (the
# whole stream), not from the head's own write.
# </details>

# %%
def head_dla(z: Float[Tensor, " d_head"], W_O: Float[Tensor, "d_head d_model"], final_resid: Float[Tensor, " d_model"],
             norm_weight: Float[Tensor, " d_model"], eps: float, W_U: Float[Tensor, "vocab d_model"], target: int,
             distractor: int) -> Float[Tensor, ""]:
    raise NotImplementedError("your code here")


cc.run(cc.check_head_dla, head_dla)

# %% [markdown]
# ## Exercise 6: a Patchscope (⏱ 20 min)
#
# `patchscope(model, source_ids, layer, position, target_ids, target_position)`: run the source prompt and keep
# the hidden state *entering* block `layer` (`model.model.layers[layer]`) at `position`; run the target prompt
# with that state written in place of the target's hidden state entering the same block at `target_position`;
# return the target's next-token logits `[vocab]` at `target_position`. The check patches at the last tokens and
# at non-final positions on both sides. The cell then asks the identity prompt what the state of " France"
# (position 3, not the last) reads as at four depths.
#
# <details><summary>Hint 1</summary>
#
# Two forward passes, one forward *pre*-hook on `model.model.layers[layer]` each: the first reads
# `args[0][0, position]`, the second returns modified `args`.
# </details>
# <details><summary>Hint 2</summary>
#
# In the write hook: `hidden = args[0].clone(); hidden[0, target_position] = saved; return (hidden, *args[1:])`,
# and return `logits[0, target_position]` (not the last position's).
# </details>

# %%
def patchscope(model, source_ids: Int[Tensor, "1 s"], layer: int, position: int, target_ids: Int[Tensor, "1 t"],
               target_position: int) -> Float[Tensor, " vocab"]:
    raise NotImplementedError("your code here")


if cc.run(cc.check_patchscope, patchscope, model, tokenizer) == "passed":
    identity = tokenizer("cat->cat; 1135->1135; hello->hello; ?", return_tensors="pt")["input_ids"]
    for layer in (8, 16, 24, 28):
        probs = patchscope(model, input_ids, layer, 3, identity, identity.shape[1] - 1).softmax(-1)
        top = probs.topk(2)
        print(f"' France' entering block {layer:>2} -> " + "  ".join(
            f"{tokenizer.decode([int(t)])!r} {p:.2f}" for p, t in zip(top.values.tolist(), top.indices)))

# %% [markdown]
# **Expected output**
#
# ```text
# ' France' entering block  8 -> ',' 0.15  ';' 0.06
# ' France' entering block 16 -> ',' 0.21  '\n' 0.16
# ' France' entering block 24 -> ' is' 0.38  ',' 0.16
# ' France' entering block 28 -> ' is' 0.61  ',' 0.12
# ```
#
# From about block 22 on, the state of " France" reads as " is": by then it carries the prediction of the next
# token more than the word itself.

# %% [markdown]
# ## Exercise 7: surfaced, then overridden (⏱ 20 min)
#
# "Did the right answer surface at some row and get overridden, or never surface at all?" `surfaced(row_logits,
# target, k)`: for one position's lens rows `[row, vocab]`, return a dict with
# `first_top1` and `first_top_k` (the first row where `target` ranks 1 / at most `k`), `peak_row` (the row of its
# highest *probability*), `lost_row` (for an overridden target: the row after its last top-1 row) and `overrider`
# (the top-1 token at `lost_row`), and `outcome`: `"kept"` (the last row's top-1), `"overridden"` (top-1 at some
# row, not at the last), `"top_k"` (in the top-k at some row, never top-1) or `"never"`. Rows are indices; -1
# where there is no such row. (`lp.surfaced` does this for whole datasets.) The cell then follows every next
# token of a sentence through the lens.
#
# <details><summary>Hint 1</summary>
#
# A rank is `1 +` the number of strictly larger logits: compute it for every row at once, then "top-1" is
# `rank == 1` and "in the top-k" is `rank <= k`.
# </details>
# <details><summary>Hint 2</summary>
#
# `kept` is decided by the last row alone. For `lost_row` take the *last* row where `rank == 1`, plus one (a target
# can dip and come back), and the overrider is `row_logits[lost_row].argmax()`, not the final top-1.
# </details>

# %%
def surfaced(row_logits: Float[Tensor, "row vocab"], target: int, k: int) -> dict:
    raise NotImplementedError("your code here")


if cc.run(cc.check_surfaced, surfaced) == "passed" and "row_logits" in globals():
    sentence = "The logit lens decodes each layer's residual stream through the model's final norm and unembedding."
    sentence_ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        sentence_logits = logit_lens(block_inputs(model, sentence_ids), model.model.norm, model.lm_head.weight)
    found = [surfaced(sentence_logits[:, p], int(sentence_ids[0, p + 1]), 5) for p in range(sentence_ids.shape[1] - 1)]
    print({o: sum(f["outcome"] == o for f in found) for o in cc.OUTCOMES}, "of", len(found), "next tokens")
    for p, f in enumerate(found):
        if f["outcome"] == "overridden":
            print(f"after {tokenizer.decode(sentence_ids[0, :p + 1])!r}: {tokenizer.decode(sentence_ids[0, p + 1])!r} "
                  f"top-1 from {labels[f['first_top1']]}, lost at {labels[f['lost_row']]} to "
                  f"{tokenizer.decode([f['overrider']])!r}")

# %% [markdown]
# **Expected output**
#
# ```text
# {'kept': 2, 'overridden': 1, 'top_k': 6, 'never': 12} of 21 next tokens
# after "The logit lens decodes each layer's residual stream through the model's final norm and unembedding": '.' top-1 from 9_pre, lost at 29_pre to ' process'
# ```

# %% [markdown]
# ## Exercise 8: a linear shortcut, and early exit (⏱ 25 min)
#
# Din et al. (2024), "Jump to Conclusions": a least-squares map from a middle row to the last one predicts the
# model's final top-1 better than reading the middle row as it is (the logit lens, i.e. the identity map); and
# a token can *exit* at the first row whose prediction is confident enough, saving the blocks above it.
#
# - `shortcut(fit_src, fit_dst, test_src, test_dst, decode)`: fit `dst ≈ src @ W + b` (`W [d, d]`, `b [d]`) by
#   least squares on the *fit* pairs; return `(W, b, precision)`, where `precision` is the share of the held-out
#   *test* pairs for which `decode(test_src @ W + b)` and `decode(test_dst)` (logits) have the same top-1.
# - `early_exit(confidence, agrees, blocks_run, threshold)`: `confidence [row, token]` is each row's top-1
#   probability, `agrees [row, token]` whether that top-1 is the model's final one, `blocks_run [row]` how many
#   blocks a row has run (0 for `embed`, `l` for `l_pre`, 30 for `29_post`; the rows may be thinned unevenly).
#   Each token exits at the first row whose confidence is at least `threshold` (the last row if none); return
#   `(exit_row [token], retention, layers_saved)`: the share of tokens whose exit row agrees, and the mean share of
#   the model's `blocks_run[-1]` blocks not run.
#
# <details><summary>Hint 1</summary>
#
# An intercept is a column of ones: `X = [src, 1]`, then `torch.linalg.lstsq(X, dst).solution` is `[d + 1, d]`,
# `W` its first `d` rows and `b` its last. Fit on `fit_*`, score on `test_*`: a fit scored on its own data flatters it.
# </details>
# <details><summary>Hint 2</summary>
#
# `confident = confidence >= threshold`, then force `confident[-1] = True` (an all-False column's `argmax` is 0,
# the *first* row), `exit_row = confident.int().argmax(0)`; `layers_saved = ((n - blocks_run[exit_row]) / n).mean()`
# with `n = blocks_run[-1]`.
# </details>

# %%
def shortcut(fit_src: Float[Tensor, "n d"], fit_dst: Float[Tensor, "n d"], test_src: Float[Tensor, "m d"],
             test_dst: Float[Tensor, "m d"], decode) -> tuple[Float[Tensor, "d d"], Float[Tensor, " d"], float]:
    raise NotImplementedError("your code here")


def early_exit(confidence: Float[Tensor, "row token"], agrees: Bool[Tensor, "row token"], blocks_run: Int[Tensor, " row"],
               threshold: float) -> tuple[Int[Tensor, " token"], float, float]:
    raise NotImplementedError("your code here")


passed = [cc.run(cc.check_shortcut, shortcut), cc.run(cc.check_early_exit, early_exit)]
if passed == ["passed", "passed"] and "rows" in globals():
    from pydoc_data.topics import topics

    docs = [" ".join(topics[key].split())[:600] for key in sorted(topics)]
    decode = lambda h: model.lm_head(model.model.norm(h.float())).double()   # noqa: E731

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

    held_ids = tokenizer(docs[77], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        held_logits = logit_lens(block_inputs(model, held_ids), model.model.norm, model.lm_head.weight)
    confidence = held_logits.softmax(-1).amax(-1)
    agrees = held_logits.argmax(-1) == held_logits[-1].argmax(-1)
    blocks_run = torch.tensor(list(range(n_layers)) + [n_layers])
    for first in (0, 15):   # every row, then only from 15_pre on (rows may be thinned: blocks_run says how)
        for threshold in (0.5, 0.9):
            _, retention, saved = early_exit(confidence[first:], agrees[first:], blocks_run[first:], threshold)
            print(f"rows from {labels[first]}, threshold {threshold}: retention {retention:.2f}, "
                  f"layers saved {saved:.1%} on {held_ids.shape[1]} tokens")

# %% [markdown]
# **Expected output**
#
# ```text
# 15_pre -> 29_post on 589 held-out tokens (1678 fit): precision@1 shortcut 0.24, identity (logit lens) 0.07
# rows from embed, threshold 0.5: retention 0.01, layers saved 99.9% on 152 tokens
# rows from embed, threshold 0.9: retention 0.03, layers saved 93.1% on 152 tokens
# rows from 15_pre, threshold 0.5: retention 0.09, layers saved 47.7% on 152 tokens
# rows from 15_pre, threshold 0.9: retention 0.41, layers saved 27.8% on 152 tokens
# ```
#
# The shortcut reads the final top-1 off `15_pre` three times as often as the logit lens does. Through the logit
# lens the embeddings row is confidently the *input* token (quiz question 9), so with every row allowed almost every
# token exits there, wrong: an exit has to start after the first blocks.

# %% [markdown]
# ## Quiz (⏱ 30 min)
#
# Answer with the functions above (and the model), then run the cell below: `check_quiz` marks each answer
# against its own computation, says why a right answer is right, and names the likely slip behind a wrong one
# without giving the answer away. Rows are named as in lens_plugins: `embed` (the input of block 0), `L_pre` (the
# input of block L), `29_post` (the last block's output, which the model decodes); give a row as its label or its
# index in `labels`. The prompt is "The capital of France is" unless stated, **tokenized as the model's own
# tokenizer does**: `tokenizer(prompt)`, 5 tokens `['The', 'Ġcapital', 'Ġof', 'ĠFrance', 'Ġis']`, no BOS
# (SmolLM2's tokenizer adds none). Tutorial 01 and every one-call form of lens_plugins tokenize the same way by
# default (`prepend_bos=None`).
#
# 1. How many rows does the logit lens of SmolLM2-135M decode?
# 2. What is the largest entropy, in nats, that any row's distribution can have?
# 3. With the prompt tokenized as above (no BOS: the 5 tokens of `tokenizer(prompt)`, as in tutorial 01), what is
#    the first row whose top-1 token at the last position is " Paris"? (A BOS in front, which TransformerLens's
#    `to_tokens` adds by default, changes the answer; tutorial 01's last section shows both.)
# 4. What is the entropy, in nats, of the model's own next-token distribution after the prompt?
# 5. What is KL(final ‖ embeddings row) at the last position, in nats?
# 6. What logit difference " Paris" − " London" does the model output after the prompt?
# 7. Which attention head has the largest direct logit attribution to " Paris" − " London" at the last
#    position, and how large is it? Answer as `("L{layer}H{head}", value)`.
# 8. How many parameters does the unembedding hold, and are they shared with the token embedding? Answer as
#    `(count, True/False)`.
# 9. In "The logit lens decodes each layer's residual stream through the model's final norm and unembedding.",
#    at what share of the positions does the embeddings row rank the input token itself first? Why so high?
# 10. Patching the hidden state entering block L at the prompt's last position into the identity prompt
#     "cat->cat; 1135->1135; hello->hello; ?" (at "?", same block): from which L does the model say " Paris"?
#     Compare with your answer to question 3.
#
# <details><summary>Hint 1</summary>
#
# Questions 3-7 and 9 are one or two lines each with `rows`, `row_logits`, `entropy`, `kl` and `head_dla`; question
# 7 needs each head's `z`: a forward pre-hook on `self_attn.o_proj` sees all heads' outputs concatenated,
# `[1, pos, heads * d_head]`.
# </details>
# <details><summary>Hint 2</summary>
#
# Head `h`'s slice of `o_proj.weight` (`[d_model, heads * d_head]`) is `[:, h * d_head:(h + 1) * d_head]`; transpose
# it to get `W_O [d_head, d_model]`. Question 10 is a loop over `L` with your `patchscope` at position -1.
# </details>

# %%
answers = {1: None, 2: None, 3: None, 4: None, 5: None, 6: None, 7: None, 8: None, 9: None, 10: None}
marks = cc.check_quiz(answers, model, tokenizer)
