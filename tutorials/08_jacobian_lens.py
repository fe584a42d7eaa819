# %% [markdown]
# # 08 · The Jacobian lens: fit one, compare it with the logit and tuned lenses, steer with its vectors
#
# The Jacobian lens (Gurnee et al. 2026) replaces the tuned lens's trained translator by a measured one: for block
# `l`, `J_l` is the average Jacobian of the last block's output with respect to block `l`'s output, summed over
# the later positions each source position reaches and averaged over source positions and prompts. A row is read
# as `W_U norm(J_l h_l)`; `J_l = I` is the logit lens. There is nothing to train: the fit is one forward pass and
# `d_model / chunk` backward passes per prompt, exact (see `docs/jacobian_lens.md`).
#
# A real lens uses ~100 prompts of 128 tokens and every block. This notebook's CPU budget is a few minutes, so it
# fits the top five blocks of SmolLM2 on three short prompts of the built-in corpus: enough to see the lens
# differ from the logit lens, not a finished lens.
#
# **Setup** (from the repository root): `make venv`, then open this notebook with the `.venv` kernel.

# %%
import torch
from plotly.subplots import make_subplots

import lens_plugins as lp
from lens_plugins.training.loop import builtin_corpus

model = lp.load_default_model(backend="nnsight")
texts = builtin_corpus()[10:13]
jlens = lp.JacobianLens.fit(model, texts, source_layers=[24, 25, 26, 27, 28], max_seq_len=32, chunk=96,
                            progress=False)
print(jlens)
# How far each matrix is from the identity (the logit lens): relative Frobenius distance.
for layer in jlens.source_layers:
    J = jlens.jacobians[layer]
    print(layer, round(float((J - torch.eye(576)).norm() / torch.eye(576).norm()), 3))

# %% [markdown]
# ## Three lenses on one prompt
#
# The same rows (block 24's output up to the model's output) decoded three ways. A tuned lens is trained for one
# step from its least-squares start (tutorial 04 trains longer). The Jacobian lens has no matrix for the
# embeddings, so the rows are chosen with `layers=`.

# %%
tuned = lp.TunedLens.train(model, None, steps=1, seq_len=32, init="shortcut", shortcut_blocks=8, progress=False)
prompt = "The Eiffel Tower is in the city of"
rows = ["25_pre", "26_pre", "27_pre", "28_pre", "29_pre", "29_post"]
results = {name: lp.nnsight.run_logit_lens(model, prompt, lens=lens, layers=rows)
           for name, lens in [("logit lens", None), ("tuned lens", tuned), ("Jacobian lens", jlens)]}
figure = make_subplots(rows=1, cols=3, subplot_titles=list(results), shared_yaxes=True)
for col, result in enumerate(results.values(), start=1):
    for trace in lp.lens_heatmap(result).data:
        if trace.type == "heatmap":
            trace.showscale = col == 3
        figure.add_trace(trace, row=1, col=col)
figure.update_layout(height=420, width=1200, title="top-1 probability per row and position")
figure.show()
for name, result in results.items():
    print(f"{name:14s}", [tops[0][0] for tops in result.top_tokens(pos=-1).values()])

# %% [markdown]
# ## Held out: KL to the model's output and next-token cross-entropy per row
#
# `evaluate_lenses` scores every lens on the same held-out token blocks; rows a lens has no map for score NaN
# (the Jacobian lens here has matrices only for blocks 24-28).

# %%
ev = lp.evaluate_lenses(model, tuned.heldout_blocks, [lp.LogitLens(), tuned, jlens],
                        names=["logit", "tuned", "jacobian"], max_blocks=2)
print(ev.table("kl").tail(7))
top = [ev.row_labels.index(r) for r in rows[:-1]]
print("mean KL over the fitted rows:", {name: round(float(ev.kl[i, top].mean()), 3)
                                         for i, name in enumerate(ev.lens_names)})
assert torch.isnan(ev.kl[2, 0]) and float(ev.kl[2, -1]) < 1e-3

# %% [markdown]
# ## Steering with a lens vector, measured
#
# The lens vector of a token at block `l` is row `t` of `W_U J_l`: the direction the lens reads as `t`. Adding it
# (scaled to the residual's norm) at the last position of a few blocks is a steering intervention; `run_jacobian_edit`
# measures what it did to the next-token distribution rather than asserting it.

# %%
edit = jlens.steering(model, " London", [26, 27, 28], alpha=1.0, positions=[-1])
effect = lp.nnsight.run_jacobian_edit(model, prompt, edit)
print(effect.description)
print("p(' London') before and after:", round(float(effect.clean_probs[0, 0]), 4), "->",
      round(float(effect.edited_probs[0, 0]), 4), "| KL(clean || edited):", round(float(effect.kl[0]), 3))
print("top tokens before:", effect.clean_top_strings[0])
print("top tokens after: ", effect.edited_top_strings[0])
