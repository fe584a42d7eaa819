# %% [markdown]
# # 07 · Course exercises: solutions
#
# Worked answers to `07_exercises.ipynb`, checked by `tutorials/course_checks.py` (plain torch and
# transformers, no lens_plugins, so the checks share no code with the package). Then: plausible wrong answers,
# and the checks failing them; and the quiz, every numerical answer computed here and, where the package
# computes the same thing by another path, checked against lens_plugins.
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
n_layers = model.config.num_hidden_layers
print(n_layers, "layers;", input_ids.shape[1], "tokens")

# %% [markdown]
# ## Exercise 1: the logit lens of one row
#
# Decode residual vectors through the final norm and the unembedding (and its bias, if any). The last block's
# output decoded this way is exactly the model's output.

# %%
def logit_lens(resid, final_norm, W_U, b_U=None):
    logits = final_norm(resid) @ W_U.T
    return logits if b_U is None else logits + b_U


assert cc.check_logit_lens(logit_lens, model, input_ids)

# %% [markdown]
# ## Exercise 2: entropy, in nats
#
# Over the vocabulary (the last axis), from `log_softmax`, which never takes the log of an underflowed 0.

# %%
def entropy(logits):
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


assert cc.check_entropy(entropy)

# %% [markdown]
# ## Exercise 3: KL(final ‖ row)
#
# The divergence of a row's distribution from the final one: expectations under the *final* distribution.

# %%
def kl(final_logits, row_logits):
    logp = torch.log_softmax(final_logits.double(), dim=-1)
    logq = torch.log_softmax(row_logits.double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


assert cc.check_kl(kl)

# %% [markdown]
# ## Exercise 4: a head's direct logit attribution
#
# The head writes `z @ W_O` into the residual stream. The final RMSNorm divides the whole stream by one scale,
# frozen at its value on the real forward pass, then multiplies by its weight; the unembedding turns the result
# into logits. So the head's share of `logit[target] − logit[distractor]` is linear in what it writes.

# %%
def head_dla(z, W_O, final_resid, norm_weight, eps, W_U, target, distractor):
    scale = (final_resid.pow(2).mean() + eps).sqrt()
    return ((z @ W_O) / scale * norm_weight) @ (W_U[target] - W_U[distractor])


assert cc.check_head_dla(head_dla)

# %% [markdown]
# ## Exercise 5: a Patchscope
#
# Read the hidden state entering block `layer` at `position` of the source; run the target with that state
# written at the input of block `layer`, at `target_position`; return the target's logits there. Forward
# pre-hooks on the decoder block do both (transformers 5 passes the hidden states as the first argument).

# %%
def patchscope(model, source_ids, layer, position, target_ids, target_position):
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

# %% [markdown]
# ## Plausible wrong answers fail
#
# Each is one slip away from a solution above; each check must reject it.

# %%
wrong = {
    "logit lens without the final norm": (cc.check_logit_lens, lambda r, n, W, b=None: r @ W.T + (0 if b is None else b)),
    "logit lens without the unembedding bias": (cc.check_logit_lens, lambda r, n, W, b=None: n(r) @ W.T),
    "entropy with softmax over the wrong axis": (
        cc.check_entropy, lambda l: -(torch.softmax(l, 0) * torch.log_softmax(l, 0)).sum(-1)),
    "entropy as p * log p after softmax": (cc.check_entropy, lambda l: -(l.softmax(-1) * l.softmax(-1).log()).sum(-1)),
    "KL with softmax over the wrong axis": (cc.check_kl, lambda p, q: (p.softmax(0) * (p.log_softmax(0) - q.log_softmax(0))).sum(-1)),
    "KL the wrong way round, KL(row || final)": (cc.check_kl, lambda p, q: kl(q, p)),
    "head DLA without the norm's scale": (
        cc.check_head_dla, lambda z, W_O, f, w, eps, W_U, t, d: ((z @ W_O) * w) @ (W_U[t] - W_U[d])),
    "head DLA without the norm's weight": (
        cc.check_head_dla, lambda z, W_O, f, w, eps, W_U, t, d: head_dla(z, W_O, f, torch.ones_like(w), eps, W_U, t, d)),
}
for name, (check, answer) in wrong.items():
    verdict = cc.run(check, answer)
    assert verdict.startswith("FAILED"), name

# a Patchscope written one block too late (at the output of block `layer`) fails too
def patchscope_one_late(model, source_ids, layer, position, target_ids, target_position):
    return patchscope(model, source_ids, layer + 1, position, target_ids, target_position)


assert cc.run(cc.check_patchscope, patchscope_one_late, model, tokenizer).startswith("FAILED")

# %% [markdown]
# ## Quiz: answers
#
# The questions are in `07_exercises.ipynb`. Every number is computed here; where lens_plugins computes the same
# quantity (through its streamed readout, a different code path), the answer is checked against it.

# %%
import math

import lens_plugins as lp

wrapped = lp.nnsight.wrap_model(model, tokenizer)
paris, london = tokenizer.encode(" Paris")[0], tokenizer.encode(" London")[0]


def block_inputs_and_output(ids):
    """Every block's input (rows embed, 1_pre, ..., 29_pre) and the last block's raw output, one forward pass."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0][0])) for b in model.model.layers]
    hooks.append(model.model.layers[-1].register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out)[0])))
    try:
        with torch.no_grad():
            logits = model(ids).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(seen), logits


rows, logits = block_inputs_and_output(input_ids)
with torch.no_grad():
    row_logits = logit_lens(rows, model.model.norm, model.lm_head.weight)   # [row, pos, vocab]
reference = lp.nnsight.run_logit_lens(wrapped, prompt, targets=[" Paris"])
answers = {}

# Q1: how many rows does the logit lens of SmolLM2-135M decode?
answers[1] = rows.shape[0]
assert answers[1] == len(reference.labels) == n_layers + 1

# Q2: the largest entropy any row can have, in nats?
answers[2] = entropy(torch.zeros(model.config.vocab_size)).item()
assert math.isclose(answers[2], math.log(model.config.vocab_size), rel_tol=1e-9)

# Q3: the first row (block input) whose top-1 at the last position is " Paris"? (No BOS, as `tokenizer(prompt)`
# and tutorial 01: "29_post". With a BOS, prepend_bos=True, it is "28_pre".)
top1 = row_logits[:, -1].argmax(-1)
answers[3] = reference.labels[int((top1 == paris).nonzero()[0])]
assert answers[3] == reference.labels[int((reference.rank_of(" Paris")[:, 0, -1] == 1).nonzero()[0])] == "29_post"
with_bos = lp.nnsight.run_logit_lens(wrapped, prompt, targets=[" Paris"], prepend_bos=True)
assert with_bos.labels[int((with_bos.rank_of(" Paris")[:, 0, -1] == 1).nonzero()[0])] == "28_pre"

# Q4: the entropy of the model's own next-token distribution after the prompt, in nats?
answers[4] = entropy(logits[-1]).item()
assert abs(answers[4] - reference.entropy[-1, 0, -1].item()) < 1e-3

# Q5: KL(final || embeddings row) at the last position, in nats?
answers[5] = kl(logits[-1], row_logits[0, -1]).item()
assert abs(answers[5] - reference.kl_final_row[0, 0, -1].item()) < 1e-2 * max(1.0, answers[5])

# Q6: the model's logit difference " Paris" - " London" after the prompt?
answers[6] = (logits[-1, paris] - logits[-1, london]).item()

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
sentence = "The logit lens decodes each layer's residual stream through the model's final norm and unembedding."
ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
sentence_rows, _ = block_inputs_and_output(ids)
with torch.no_grad():
    own_first = logit_lens(sentence_rows[0], norm, model.lm_head.weight).argmax(-1) == ids[0]
answers[9] = own_first.float().mean().item()
package = lp.nnsight.run_logit_lens(wrapped, sentence, reductions=["input_token"]).input_token_rank[0, 0]
assert answers[9] == (package == 1).float().mean().item()

# Q10: the first block whose input, patched from the prompt's last position into the identity prompt's "?",
# makes the model say " Paris"?
identity = tokenizer("cat->cat; 1135->1135; hello->hello; ?", return_tensors="pt")["input_ids"]
says = [patchscope(model, input_ids, L, -1, identity, -1).argmax().item() == paris for L in range(n_layers)]
answers[10] = f"{says.index(True)}_pre" if True in says else None
scope = lp.patchscope(wrapped, prompt, positions=[-1], targets=[" Paris"])
assert answers[10] == scope.labels[int((scope.rank_of(" Paris")[:, 0, -1] == 1).nonzero()[0])]

for q, a in answers.items():
    print(f"Q{q:>2}: {a}")
