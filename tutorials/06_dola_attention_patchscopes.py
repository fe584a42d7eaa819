# %% [markdown]
# # 06 · DoLa, attention sinks, Patchscopes
#
# Three more ways to look inside SmolLM2-135M, all on one TransformerLens model:
# - **DoLa** (Chuang et al. 2023) decodes by contrasting the final layer with the premature layer whose
#   lens distribution differs most from it, to favour what the last layers *add* (often facts);
# - **attention views** show where each head looks, and that many heads park their attention on the first
#   token (an *attention sink*, Xiao et al. 2023);
# - **Patchscopes** (Ghandeharioun et al. 2024) let the model itself read a hidden state: the state is written
#   into a neutral "identity" prompt and the model says what it encodes.
#
# **Setup** (from the repository root): `make venv`, then open this notebook with the `.venv` kernel
# (e.g. `.venv/bin/pip install jupyterlab && .venv/bin/jupyter lab tutorials/`).

# %%
import torch

import lens_plugins as lp
from lens_plugins.plot import attention as plot_attention

model = lp.load_default_model(backend="transformer_lens")
n_layers = model.cfg.n_layers

# %% [markdown]
# ## DoLa on a factual prompt
#
# At each step the last position is decoded at the candidate premature layers (`"high"`: the upper half,
# as in transformers 4.x) and at the final layer; the premature layer is the candidate with the largest
# Jensen-Shannon divergence from the final distribution, and the next token maximises
# `log p_final − log p_premature` among the tokens with `p_final ≥ 0.1 · max p_final`. Greedy decoding is
# the reference: it is what DoLa becomes when the final layer is the only candidate.

# %%
prompt = "Q: What is the capital of France?\nA: The capital of France is"


def greedy(text, steps):
    ids = model.to_tokens(text, prepend_bos=False)  # as run_dola: the tokenizer's own ids (SmolLM2's adds no BOS)
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0]


steps = 6
dola = lp.transformer_lens.run_dola(model, prompt, max_new_tokens=steps, layers="high")
reference = greedy(prompt, steps)
print("greedy:", repr(model.tokenizer.decode(reference[-steps:])))
print("DoLa:  ", repr(dola.text), " premature layers", dola.premature_layers)
# the chosen layer is the candidate of largest JS divergence, at every step
chosen = [dola.candidate_layers[i] for i in dola.js.argmax(dim=1).tolist()]
assert chosen == dola.premature_layers and all(l in dola.candidate_layers for l in chosen)
# with the final layer as the only candidate DoLa is greedy decoding
only_final = lp.transformer_lens.run_dola(model, prompt, max_new_tokens=steps, layers=[n_layers])
assert only_final.generated_ids == reference[-steps:].tolist()

# %% [markdown]
# ## Attention views and the attention sink
#
# `lp.transformer_lens.run_attention` caches every layer's attention pattern (`[layer, batch, head, query, key]`,
# float32). A head's *sink score* is the mean share of attention its queries put on the first token.

# %%
attn = lp.transformer_lens.run_attention(model, "The Eiffel Tower is in the city of Paris, in France.")
patterns = attn.patterns
assert torch.allclose(patterns.sum(-1), torch.ones(patterns.shape[:-1]), atol=1e-4)   # each query's row sums to 1
sink = attn.sink_score()[:, 0]                       # [layer, head]
middle = sink[n_layers // 3 : 2 * n_layers // 3]
layer, head = divmod(int(sink.argmax()), sink.shape[1])
print(f"sink score: mean {sink.mean():.2f}; middle third of the layers {middle.mean():.2f}; "
      f"{int((middle > 0.5).sum())}/{middle.numel()} middle heads put over half their attention on the first token")
print(f"strongest sink: layer {layer} head {head} ({sink[layer, head]:.2f})")
assert (middle > 0.5).float().mean() > 0.5          # most middle-layer heads are sinks
plot_attention.sink_figure(attn).show()
plot_attention.head_view(attn, layer, head).show()

# %% [markdown]
# ## Patchscopes: the model reads its own hidden state
#
# `lp.patchscope` takes the hidden state of the source prompt at every lens row at the last position, writes it
# at the same row into the identity prompt `"cat->cat; 1135->1135; hello->hello; ?"` in place of `?`, and
# reads the model's next-token distribution there. Its "final" reference is the model's own prediction, so
# `final_top1_rank == 1` says the Patchscope reads out the model's answer. Compare with the logit lens of the
# same rows: a Patchscope lets the remaining layers finish the decoding, so it can read the answer off
# earlier rows than the lens, which decodes each row directly.

# %%
source = "The capital of France is"
scope = lp.patchscope(model, source, positions=[-1], max_new_tokens=3)
lens = lp.transformer_lens.run_logit_lens(model, source, positions=[-1])
reads_answer = scope.final_top1_rank[:, 0, -1] == 1
lens_answer = lens.final_top1_rank[:, 0, -1] == 1
for r, label in enumerate(scope.labels):
    if r % 3 == 0 or r >= len(scope.labels) - 8:
        print(f"{label:>8}  patchscope top-1 {scope.top_tokens(-1)[label][0][0]!r:>10} "
              f"(continues {scope.generated(-1)[label]!r:>14})   logit lens top-1 {lens.top_tokens(-1)[label][0][0]!r:>8}")
first_scope = int(reads_answer.nonzero()[0])
first_lens = int(lens_answer.nonzero()[0])
print(f"first row reading the model's answer: patchscope {scope.labels[first_scope]}, logit lens {lens.labels[first_lens]}")
assert reads_answer[-1] and first_scope <= first_lens
scope.plot("final_top1_rank").show()
