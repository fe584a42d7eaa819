# %% [markdown]
# # 07 · Course exercises: the logit lens and its family from scratch
#
# Five functions to write with plain torch on SmolLM2-135M (a Hugging Face `LlamaForCausalLM`), each with a
# check from `tutorials/course_checks.py` that passes only for a correct implementation, then a ten-question
# quiz. Replace each `raise NotImplementedError` with your code and re-run the cell: the check prints
# `passed`, `FAILED: why`, or `not done yet`. Worked answers: `07_solutions.ipynb`.
#
# **Setup** (from the repository root): `make venv`, then open this notebook with the `.venv` kernel
# (e.g. `.venv/bin/pip install jupyterlab && .venv/bin/jupyter lab tutorials/`), started in `tutorials/`
# or with `tutorials/` on `PYTHONPATH` so that `import course_checks` works.

# %%
import torch

import course_checks as cc
from lens_plugins.models import default_model_dir, load_hf_model

model, tokenizer = load_hf_model(default_model_dir())   # SmolLM2-135M as a Hugging Face LlamaForCausalLM
prompt = "The capital of France is"
input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
print(model.config.num_hidden_layers, "layers;", input_ids.shape[1], "tokens")
print("final norm:", model.model.norm, "| unembedding:", model.lm_head)

# %% [markdown]
# ## Exercise 1: the logit lens of one row
#
# `logit_lens(resid, final_norm, W_U, b_U=None)`: `resid` is `[..., d_model]` (residual vectors: one row of
# the lens), `final_norm` the model's final norm module, `W_U` the unembedding `[vocab, d_model]`, `b_U` its
# bias or `None`. Return the logits `[..., vocab]` the model would produce if it stopped there. The check also
# decodes the real model's last block output, which must give the model's own logits.

# %%
def logit_lens(resid, final_norm, W_U, b_U=None):
    raise NotImplementedError("your code here")


cc.run(cc.check_logit_lens, logit_lens, model, input_ids)

# %% [markdown]
# ## Exercise 2: entropy
#
# `entropy(logits)`: the entropy in nats of the distribution `softmax(logits)` over the last axis (the
# vocabulary), for logits of any leading shape. Some of the check's probabilities underflow to exactly 0.

# %%
def entropy(logits):
    raise NotImplementedError("your code here")


cc.run(cc.check_entropy, entropy)

# %% [markdown]
# ## Exercise 3: KL divergence from the final row
#
# `kl(final_logits, row_logits)`: KL(final ‖ row) in nats over the last axis: how far a lens row's
# distribution is from the model's final one, the quantity a tuned lens is trained to minimise.

# %%
def kl(final_logits, row_logits):
    raise NotImplementedError("your code here")


cc.run(cc.check_kl, kl)

# %% [markdown]
# ## Exercise 4: one head's direct logit attribution
#
# `head_dla(z, W_O, final_resid, norm_weight, eps, W_U, target, distractor)`: attention head `h` writes
# `z @ W_O` into the residual stream (`z`: its `[d_head]` output at one position, `W_O`: its `[d_head, d_model]`
# slice of the output projection). Return its contribution to `logit[target] − logit[distractor]` through the
# final RMSNorm, whose scale `sqrt(mean(final_resid²) + eps)` is frozen at its value on the real forward pass,
# and whose weight is `norm_weight`, then the unembedding `W_U`.

# %%
def head_dla(z, W_O, final_resid, norm_weight, eps, W_U, target, distractor):
    raise NotImplementedError("your code here")


cc.run(cc.check_head_dla, head_dla)

# %% [markdown]
# ## Exercise 5: a Patchscope
#
# `patchscope(model, source_ids, layer, position, target_ids, target_position)`: run the source prompt and keep
# the hidden state *entering* block `layer` (`model.model.layers[layer]`) at `position`; run the target prompt
# with that state written in place of the target's hidden state entering the same block at `target_position`;
# return the target's next-token logits `[vocab]` at `target_position`. Hint: `register_forward_pre_hook`.

# %%
def patchscope(model, source_ids, layer, position, target_ids, target_position):
    raise NotImplementedError("your code here")


cc.run(cc.check_patchscope, patchscope, model, tokenizer)

# %% [markdown]
# ## Quiz
#
# Answer with the functions above (and the model); `07_solutions.ipynb` computes every answer. Rows are named
# as in lens_plugins: `embed` (the input of block 0), `L_pre` (the input of block L), `29_post` (the last
# block's output, which the model decodes). The prompt is "The capital of France is" unless stated, tokenized
# as the model's tokenizer does (`tokenizer(prompt)`: SmolLM2's adds no BOS), as in tutorial 01 and as every
# one-call form of lens_plugins does by default (`prepend_bos=None`).
#
# 1. How many rows does the logit lens of SmolLM2-135M decode?
# 2. What is the largest entropy, in nats, that any row's distribution can have?
# 3. What is the first row whose top-1 token at the last position is " Paris"?
# 4. What is the entropy, in nats, of the model's own next-token distribution after the prompt?
# 5. What is KL(final ‖ embeddings row) at the last position, in nats?
# 6. What logit difference " Paris" − " London" does the model output after the prompt?
# 7. Which attention head has the largest direct logit attribution to " Paris" − " London" at the last
#    position, and how large is it?
# 8. How many parameters does the unembedding hold, and are they shared with the token embedding?
# 9. In "The logit lens decodes each layer's residual stream through the model's final norm and unembedding.",
#    at what share of the positions does the embeddings row rank the input token itself first? Why so high?
# 10. Patching the hidden state entering block L at the prompt's last position into the identity prompt
#     "cat->cat; 1135->1135; hello->hello; ?" (at "?", same block): from which L does the model say " Paris"?
#     Compare with your answer to question 3.
