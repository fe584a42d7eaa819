# %% [markdown]
# # 01 · The logit lens
#
# The logit lens (nostalgebraist, 2020) decodes the residual stream *between* layers with the model's own
# final norm and unembedding: "what would the model predict if it stopped here?". Reading it row by row
# shows where in depth an answer appears. This tutorial runs it on the embedded SmolLM2-135M-Instruct
# (30 layers, CPU, a few seconds), which completes "The capital of France is" with " Paris", and checks the
# original post's four observations on it, with `assert`s on numbers computed here.
#
# **Setup** (from the repository root): `make venv`, then open this notebook with the `.venv` kernel
# (e.g. `.venv/bin/pip install jupyterlab && .venv/bin/jupyter lab tutorials/`). `tutorials/01_logit_lens.py`
# holds the same cells as a script; `tests/test_tutorials.py` keeps the pair in sync and runs the notebook.

# %%
import torch

import lens_plugins as lp
from lens_plugins.plot import html_report

model = lp.load_default_model(backend="transformer_lens")  # a TransformerBridge; no model hub involved
prompt = "The capital of France is"
# The prompt as the model's own tokenizer reads it (SmolLM2's adds no BOS): the ids model.generate, nnsight and
# every one-call form of lens_plugins run by default. TransformerLens's `to_tokens` would prepend a BOS, which
# changes the numbers below (see "BOS or not" at the end).
tokens = model.to_tokens(prompt, prepend_bos=False)
print(model.cfg.n_layers, "layers; tokens:", model.to_str_tokens(tokens[0]))

# %% [markdown]
# ## Cache only what the lens needs
#
# `hook_filter(model)` names the hooks the lens reads: `hook_embed` (from which the lens recovers the
# prompt's tokens) and the residual stream before each block plus after the last one. Caching only
# these keeps memory small on long prompts.

# %%
lens_hooks = lp.transformer_lens.hook_filter(model)
print(len(lens_hooks), "hooks:", lens_hooks[:3], "...", lens_hooks[-1])
logits, cache = model.run_with_cache(tokens, names_filter=lens_hooks)

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
#
# *Observation 4 of the post: the answer's rank across rows.* The assertions below are the claim: the
# model's answer is far down the list at the embeddings and through the first two thirds, and the first
# row that ranks it first is in the last sixth of the model.

# %%
paris_rank = result.rank_of(" Paris")[:, 0, -1]
for label, rank in zip(result.labels, paris_rank.tolist()):
    print(f"{label:>8}  rank {rank:>6}  " + "#" * max(0, 16 - rank.bit_length()))

n_rows = len(result.labels)
first_top = int((paris_rank == 1).nonzero()[0])
print(f"' Paris' is first from row {result.labels[first_top]} ({first_top}/{n_rows - 1}) on; "
      f"best rank in the first two thirds: {paris_rank[: 2 * n_rows // 3].min().item()}")
assert paris_rank[-1] == 1 and paris_rank[0] > 1000
assert paris_rank[: 2 * n_rows // 3].min() > 10
assert first_top >= 5 * (n_rows - 1) // 6 and (paris_rank[first_top:] == 1).all()

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
fig.show()
fig.write_html("01_logit_lens.html", include_plotlyjs=True)
report = html_report(result, "01_logit_lens_report.html", overwrite=True)
print("wrote 01_logit_lens.html and", report)

# %% [markdown]
# ## Input discarding
#
# nostalgebraist's addendum: decoded through the lens, the embeddings mostly predict the *input* token
# itself (SmolLM2 ties its input and output embeddings), and the first block throws that away. The
# `input_token` reduction ranks each position's own token at every row; `kl_input_row` measures how far
# each row has moved from the decoded embeddings. Reductions are opt-in by name, so only these are computed.
#
# *Observation 3: the input token is discarded after the first block.* On a sentence of ordinary text the
# embeddings rank each position's own token first almost everywhere; one block later, nowhere.

# %%
text = "The logit lens decodes each layer's residual stream through the model's final norm and unembedding."
moved = lp.transformer_lens.run_logit_lens(
    model, text, reductions=["input_token", "kl_input_row", "kl_final_row", "final_top1"])
own_rank = moved.input_token_rank[:, 0].float()
for label, ranks, kl_in in list(zip(moved.labels, own_rank, moved.kl_input_row[:, 0]))[:4]:
    print(f"{label:>8}  input token ranked first at {int((ranks == 1).sum())}/{len(ranks)} positions, "
          f"median rank {ranks.median().item():6.0f}, mean KL(input||row) {kl_in.mean().item():6.2f}")

first_share = (own_rank == 1).float().mean(dim=1)          # per row: share of positions ranking their own token first
assert first_share[0] > 0.6 and first_share[1] == 0
assert own_rank[1].median() > 10                          # not merely demoted to second place

# %% [markdown]
# ## Early rows are far from the output; the approach is smooth only at the end
#
# *Observations 1 and 2.* Averaged over the sentence's positions, KL(final || row) measures how far each row's
# guess is from what the model finally says, and `final_top1_rank == 1` how often its top-1 is already the final one.
# The post saw GPT-2's guesses converge smoothly with depth. SmolLM2 is far from its output at every early
# and middle row (KL over 10 nats, the final top-1 rarely on top), the middle rows drift *further* away, and the
# approach is smooth, a steady fall of the KL at most positions, over roughly the last third of the model.

# %%
kl_mean = moved.kl_final_row[:, 0].mean(dim=1)
agree = (moved.final_top1_rank[:, 0] == 1).float().mean(dim=1)
falling = (moved.kl_final_row[1:, 0] < moved.kl_final_row[:-1, 0]).float().mean(dim=1)  # row r-1 -> r
for r, label in enumerate(moved.labels):
    fall = "" if r == 0 else f"  KL falls at {falling[r - 1]:4.0%} of positions"
    print(f"{label:>8}  mean KL(final||row) {kl_mean[r]:7.2f}  top-1 = final at {agree[r]:4.0%}{fall}")

third = n_rows // 3
late = slice(n_rows - third, n_rows)                       # the last third of the rows, output included
assert kl_mean[: 2 * third].min() > max(10, 3 * kl_mean[-2])   # every early row far (over 10 nats), much further than the one before the output
assert agree[: n_rows // 2].max() < 0.25 and agree[-2] > agree[: n_rows // 2].max()
# a steady fall into and through the last third, not through the middle (the step into row r is falling[r - 1])
assert falling[-third:].mean() > 0.75 > falling[1 : 2 * third - 1].mean()


def spearman(values):
    """Rank correlation with depth: -1 for a curve that only falls."""
    depth = torch.arange(len(values), dtype=torch.float)
    ranks = values.argsort().argsort().float()
    return torch.corrcoef(torch.stack([depth, ranks]))[0, 1].item()


print(f"rank correlation of mean KL with depth: last third {spearman(kl_mean[late]):+.2f}, "
      f"first two thirds {spearman(kl_mean[1 : 2 * third]):+.2f}")
assert spearman(kl_mean[late]) < -0.9

# %%
lp.plot.metric_trajectory(moved, ["kl_final_row"], pos=-2).show()

# %% [markdown]
# ## BOS or not
#
# Whether the prompt starts with a BOS token changes what every row sees, so it changes the numbers. Every
# one-call form of lens_plugins (`run_logit_lens`, `run_attribution`, ..., the command line and the report), on
# TransformerLens and on nnsight alike, takes `prepend_bos`: `None` (the default) tokenizes as the model's own
# Hugging Face tokenizer does, as above, as `model.generate` and as your own nnsight traces; `True` starts the
# prompt with exactly one BOS (what TransformerLens's `to_tokens` does by default); `False` with none. The
# course's quiz (`07_exercises`) uses the default, so its question 3 is answered by the row found above.

# %%
for prepend_bos in (None, True):
    run = lp.transformer_lens.run_logit_lens(model, prompt, targets=[" Paris"], prepend_bos=prepend_bos)
    first = run.labels[int((run.rank_of(" Paris")[:, 0, -1] == 1).nonzero()[0])]
    p_paris = run.target_logprobs[-1, 0, -1, 0].exp().item()
    print(f"prepend_bos={prepend_bos!s:5}  {run.str_tokens(0)[:2]} ...  P(' Paris') {p_paris:.3f}, first on top at {first}")
    if prepend_bos is None:  # the default is the lens above: the same ids, the same first row
        assert torch.equal(run.token_ids.cpu(), tokens.cpu()) and first == result.labels[first_top]
assert run.labels.index(first) < first_top  # with a BOS (the last run), " Paris" comes out on top earlier
