# %% [markdown]
# # 05 · Latent language: does the model think in English?
#
# Wendler et al. (2024, "Do Llamas Work in English?") translate between two non-English languages
# (here French → German) and follow two **token sets** through the logit lens at the position where the answer
# starts: the spellings of the German answer, and the spellings of the English word for the same concept. In
# Llama-2 the English word rises in the middle layers and the German one only at the end.
#
# This notebook runs the same measurement on SmolLM2-135M, a small, mostly English model. **What it shows is
# mostly a negative result**: the model barely translates, so neither set gets much probability at any row.
# The assertions at the end pin that down, so the text stays true if the numbers change.
#
# **Setup** (from the repository root): `make venv`, then open this notebook with the `.venv` kernel
# (e.g. `.venv/bin/pip install jupyterlab && .venv/bin/jupyter lab tutorials/`).

# %%
import plotly.graph_objects as go
import torch

import lens_plugins as lp

model = lp.load_default_model(backend="transformer_lens")
tokenizer = model.tokenizer
shots = [("livre", "Buch"), ("chien", "Hund"), ("eau", "Wasser"), ("maison", "Haus")]
words = [("soleil", "Sonne", "sun"), ("lune", "Mond", "moon"), ("chat", "Katze", "cat"),
         ("arbre", "Baum", "tree"), ("fleur", "Blume", "flower"), ("oiseau", "Vogel", "bird")]


def translation_prompt(word):
    return "".join(f'Français: "{fr}" - Deutsch: "{de}"\n' for fr, de in shots) + f'Français: "{word}" - Deutsch: "'


print(translation_prompt("soleil"))

# %% [markdown]
# ## Token sets
#
# Most German words are several tokens in SmolLM2's vocabulary, so, like Wendler et al., a word is represented
# by the *first* token of each of its spellings (with and without a leading space; German nouns are
# capitalised, and a lower-case "son" would count an English word),
# keeping only first tokens of at least three characters (a bare "B" or "Bl" would count every word that
# starts so). English words are mostly single tokens: `lp.tokens.variants` lists those spellings. A word
# whose German spellings have no distinctive first token, or whose two sets share a token, is left out.

# %%
def first_tokens(word):
    found = []
    for text in (word, " " + word):
        first = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:1])
        if len(first.strip()) >= 3 and first not in found:
            found.append(first)
    return found


sets = {}
for french, german, english in words:
    target, latent = first_tokens(german), lp.tokens.variants(tokenizer, english, verbose=False)
    if target and not set(target) & set(latent):
        sets[french] = {"german": target, "english": latent}
    else:
        print(f"left out {french!r}: German first tokens {target}, English {latent}")
for french, members in sets.items():
    print(f"{french:>8}: german {members['german']}, english {members['english']}")
assert len(sets) >= 3

# %% [markdown]
# ## The trajectories
#
# One lens per word, at the last position only (`positions=[-1]`), with both sets and their members as
# targets. A set's probability is the sum of its members' probabilities, and its rank is the best member's
# rank: the first assertions check exactly that.

# %%
results = {}
for french, members in sets.items():
    res = lp.transformer_lens.run_logit_lens(
        model, translation_prompt(french), positions=[-1], token_sets=members,
        targets=members["german"] + members["english"], reductions=["top_k"])
    for name, spellings in members.items():
        summed = torch.stack([res.logprob_of(t).exp() for t in spellings]).sum(0)
        best = torch.stack([res.rank_of(t) for t in spellings]).min(0).values
        assert torch.allclose(res.set_prob(name), summed, rtol=1e-4, atol=1e-7)
        assert torch.equal(res.set_rank(name), best)
    results[french] = res

labels = results[next(iter(results))].labels
german = torch.stack([r.set_prob("german")[:, 0, -1] for r in results.values()])    # [word, row]
english = torch.stack([r.set_prob("english")[:, 0, -1] for r in results.values()])
for french, res in results.items():
    final = res.top_tokens(-1)[labels[-1]][:3]
    print(f"{french:>8}: final top-3 {[(t, round(p, 2)) for t, p in final]}")

figure = go.Figure()
for name, values in (("German (answer)", german), ("English (latent?)", english)):
    figure.add_scatter(x=labels, y=values.mean(0).tolist(), name=name + ", mean over words")
figure.update_layout(title="Token-set probability at the answer position, French → German",
                     xaxis_title="residual stream row", yaxis_title="probability")
figure.show()
lp.plot.trajectory_figure(results["soleil"] if "soleil" in results else res, kind="rank").show()

# %% [markdown]
# ## What a 135M model shows
#
# The numbers below are computed, not typed. In Llama-2-7B the English set reaches a sizeable probability in
# the middle rows and the target set overtakes it only near the output. SmolLM2-135M does not get there: it
# mostly answers with a single letter (it starts spelling the word), the German set stays small at the output,
# and neither set carries more than a few per cent at any row, so there is no middle-layer English plateau to
# see. Where a concept word does show up, it is the *English* one, in the last rows and at the output (the
# model offers "Sun" for "soleil"): the output leans English, which is the bias Wendler et al. trace back to
# the middle layers, but here it cannot be told apart from the model simply not knowing German. The
# experiment needs a model that can do the task; the measurement (token sets through the lens) carries over.

# %%
right = sum(int(r.top_ids[-1, 0, -1, 0]) in r.target_ids[: len(sets[f]["german"])].tolist()
            for f, r in results.items())
peak_row_en = english.max(0).values.argmax().item()
print(f"translated (German first token on top at the output): {right}/{len(results)} words")
print(f"mean probability of the German set at the output: {german[:, -1].mean():.3f}")
print(f"peak of the English set over rows and words: {english.max():.3f} (mean curve peaks at {labels[peak_row_en]})")
print(f"peak of the German set over rows and words: {german.max():.3f}")
print(f"at the output the English set outweighs the German one for {(english[:, -1] > german[:, -1]).sum()}/{len(results)} "
      f"words (mean {english[:, -1].mean():.3f} vs {german[:, -1].mean():.3f})")
assert german[:, -1].mean() < 0.5 and right < len(results)   # the model mostly fails the task
assert english[:, -1].mean() > german[:, -1].mean()           # what shows at the output leans English
assert english.max() < 0.5 and german.max() < 0.5             # no row puts a majority on either language
