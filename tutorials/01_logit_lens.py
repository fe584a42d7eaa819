# %% [markdown]
# # 01 · The logit lens
#
# The logit lens (nostalgebraist, 2020) decodes the residual stream *between* layers with the model's own
# final norm and unembedding: "what would the model predict if it stopped here?". Reading it row by row
# shows where in depth an answer appears. This tutorial runs it on the embedded SmolLM2-135M-Instruct
# (30 layers, CPU, a few seconds), which completes "The capital of France is" with " Paris".
#
# This file and `01_logit_lens.ipynb` hold the same cells; `tests/test_tutorials.py` keeps them in sync.

# %%
import lens_plugins as lp
from lens_plugins.plot import html_report

model = lp.load_default_model(backend="transformer_lens")  # a TransformerBridge; no model hub involved
prompt = "The capital of France is"
print(model.cfg.n_layers, "layers; tokens:", model.to_str_tokens(prompt))

# %% [markdown]
# ## Cache only what the lens needs
#
# `hook_filter(model)` names the hooks the lens reads: `hook_embed` (from which the lens recovers the
# prompt's tokens) and the residual stream before each block plus after the last one. Caching only
# these keeps memory small on long prompts.

# %%
lens_hooks = lp.transformer_lens.hook_filter(model)
print(len(lens_hooks), "hooks:", lens_hooks[:3], "...", lens_hooks[-1])
logits, cache = model.run_with_cache(prompt, names_filter=lens_hooks)

# %% [markdown]
# ## The lens
#
# Importing `lens_plugins` gave every `ActivationCache` a `.lens` accessor. `targets` are single tokens
# (mind the leading space) whose rank is tracked at every row and position.

# %%
result = cache.lens.logit_lens(top_k=5, targets=[" Paris"])
print(result)

# %% [markdown]
# ## Top tokens at the last position
#
# Rows are labelled `embed`, `1_pre` (the stream entering block 1), ..., `29_post` (the stream after
# the last block, which the model itself decodes, so that row *is* the model's prediction).

# %%
for row, top in result.top_tokens(-1).items():
    print(f"{row:>8}  " + "  ".join(f"{token!r} {p:.2f}" for token, p in top))

final_top1 = logits[0, -1].argmax().item()
print("model's own top-1:", repr(model.tokenizer.decode([final_top1])))

# %% [markdown]
# ## The rank of " Paris" falls with depth
#
# Rank 1 is the top token. " Paris" sits thousands deep through the first two thirds of the model and
# reaches rank 1 only in the last few blocks: the answer is computed late. (The bar is longer for a
# better rank: one '#' per halving of the rank below 2**16.)

# %%
paris_rank = result.rank_of(" Paris")[:, 0, -1]
for label, rank in zip(result.labels, paris_rank.tolist()):
    print(f"{label:>8}  rank {rank:>6}  " + "#" * max(0, 16 - rank.bit_length()))

# %% [markdown]
# ## Entropy and divergence from the final row
#
# `entropy` is that of the row's own distribution; `kl_final_row` is KL(final || row) in nats, the
# quantity a tuned lens is trained to minimise. The KL falls towards the top and is exactly 0 at the
# last row, which is the model's output. The entropy does not simply fall: the middle rows are
# confidently wrong (they bet on punctuation), and the late rows spread their mass over candidate
# answers before the last blocks sharpen it on " Paris".

# %%
entropy = result.metric("entropy")[:, 0, -1]
kl = result.metric("kl_final_row")[:, 0, -1]
for label, h, d in zip(result.labels, entropy.tolist(), kl.tolist()):
    print(f"{label:>8}  entropy {h:5.2f}  KL(final||row) {d:5.2f}")

# %% [markdown]
# ## As a table
#
# `to_dataframe()` has one row per (lens row, prompt, position) with the top-1 and every metric, ready
# for pandas.

# %%
df = result.to_dataframe()
last = df[df["pos"] == df["pos"].max()]
print(last[["row", "top1", "top1_prob", "entropy", "kl_final_row", "rank[ Paris]"]].tail(8).to_string(index=False))

# %% [markdown]
# ## As a heatmap
#
# `result.plot(metric)` returns a plotly figure: the embedding at the bottom, the output at the top, each
# cell labelled with its top-1 and its hover listing the top-5. In Jupyter, `fig.show()` draws it inline;
# here it is written to a standalone HTML file (plotly.js inlined, so it opens offline), alongside a
# report with one heatmap per metric.

# %%
fig = result.plot("prob")
fig.write_html("01_logit_lens.html", include_plotlyjs=True)
report = html_report(result, "01_logit_lens_report.html")
print("wrote 01_logit_lens.html and", report)

# %% [markdown]
# ## Input discarding
#
# nostalgebraist's addendum: decoded through the lens, the embeddings mostly predict the *input* token
# itself (SmolLM2 ties its input and output embeddings), and the first block throws that away. The
# `input_token` reduction ranks each position's own token at every row; `kl_input_row` measures how far
# each row has moved from the decoded embeddings. Reductions are opt-in by name, so only these are computed.

# %%
text = "The logit lens decodes each layer's residual stream through the model's final norm and unembedding."
moved = lp.transformer_lens.run_logit_lens(model, text, reductions=["input_token", "kl_input_row"])
own_rank = moved.input_token_rank[:, 0].float()
for label, ranks, kl_in in list(zip(moved.labels, own_rank, moved.kl_input_row[:, 0]))[:4]:
    print(f"{label:>8}  input token ranked first at {int((ranks == 1).sum())}/{len(ranks)} positions, "
          f"median rank {ranks.median().item():6.0f}, mean KL(input||row) {kl_in.mean().item():6.2f}")
