# %% [markdown]
# # 03 · Why the prediction happens: sublayers, direct logit attribution, an ablation
#
# The logit lens (tutorial 01) says *where* in depth SmolLM2-135M starts to answer " Paris" to
# "The capital of France is". This notebook asks *which parts* write the answer: the lens after each attention
# and MLP sublayer, the logit difference " Paris" − " London" across rows, the direct logit attribution (DLA)
# of that difference to every component and head, and an ablation that checks the top component is causal.
#
# **Setup** (from the repository root): `make venv`, then open this notebook with the `.venv` kernel
# (e.g. `.venv/bin/pip install jupyterlab && .venv/bin/jupyter lab tutorials/`).

# %%
import torch

import lens_plugins as lp
from lens_plugins import plot
from lens_plugins.plot.attribution import attribution_bars

model = lp.load_default_model(backend="transformer_lens")
prompt, answer, rival = "The capital of France is", " Paris", " London"
hooks = lp.transformer_lens.hook_filter(model, sublayers=True, attribution=True)
logits, cache = model.run_with_cache(prompt, names_filter=hooks)
paris, london = model.to_single_token(answer), model.to_single_token(rival)
model_diff = (logits[0, -1, paris] - logits[0, -1, london]).item()
print(f"the model's own logit difference {answer!r} - {rival!r}: {model_diff:.3f}")

# %% [markdown]
# ## The lens after every sublayer
#
# `sublayers=True` adds a row after each attention (`3_attn`: the residual once block 3's attention has
# written) and each MLP (`3_mlp`). The rank of " Paris" shows which kind of sublayer moves it.

# %%
sub = cache.lens.logit_lens(sublayers=True, targets=[answer], reductions=["top_k", "kl_final_row"])
rank = sub.rank_of(answer)[:, 0, -1]
jumps = [(sub.labels[r], rank[r - 1].item(), rank[r].item()) for r in range(1, len(rank))]
for label, before, after in sorted(jumps, key=lambda j: j[2] / j[1])[:6]:
    print(f"{label:>8}: rank of {answer!r} {before:>6} -> {after:>5}")
assert sub.labels[1:3] == ["0_attn", "0_mlp"] and len(sub.labels) == 1 + 2 * model.cfg.n_layers
assert rank[-1] == 1

# %% [markdown]
# ## The logit difference across rows
#
# `cache.lens.logit_diff` decodes every row and position and keeps only logit(" Paris") − logit(" London").
# At the last row it is exactly the model's own difference (the final row *is* the output).

# %%
diff = cache.lens.logit_diff(answer, rival, sublayers=True)
last = diff.values[:, 0, -1]
for label, value in list(zip(diff.labels, last.tolist()))[-12:]:
    print(f"{label:>8}  {value:+7.3f}")
assert abs(last[-1].item() - model_diff) < 1e-3
plot.logit_diff_trajectory(diff).show()

# %% [markdown]
# ## Direct logit attribution
#
# The final residual is a sum of writes (embeddings, each attention layer, each MLP); with the final norm's
# scale frozen at its value on this forward pass, the logit difference is a sum of one number per write plus a
# constant. `report()` checks that the parts add up.

# %%
dla = cache.lens.attribution(answer, rival)
print(dla.report())
top = dla.top(6)
for label, value in top:
    print(f"{label:>10}  {value:+.3f}")
assert dla.error.item() < 1e-3 and abs(dla.explained.item() - model_diff) < 1e-3
attribution_bars(dla, n=10).show()

# %% [markdown]
# Per head: `by="head"` splits each attention layer's write into its heads (plus the output bias).

# %%
heads = dla.view("head")
print("top heads:", [(label, round(value, 3)) for label, value in heads.top(5) if label.startswith("L")])
heads.plot().show()
# the head split refines the component split: the heads and bias of a layer add up to that layer's attention
layer = int(top[0][0].split("_")[0]) if top[0][0].endswith("_attn") else 0
assert torch.allclose(dla.heads[0, layer].sum() + dla.head_bias[0, layer], dla.attn[0, layer], atol=1e-4)

# %% [markdown]
# ## An ablation confirms the top component
#
# DLA is correlational: it measures what a component writes in this forward pass, not what happens without
# it (later layers could compensate). Zeroing the top component's output in a rerun and comparing with zeroing
# a component of near-zero attribution is the sanity check.

# %%
def logit_diff_with(hooks=()):
    with torch.no_grad():
        out = model.run_with_hooks(prompt, fwd_hooks=list(hooks))[0, -1]
    return (out[paris] - out[london]).item()


def zero(act, hook):
    return torch.zeros_like(act)


def hook_of(label):
    layer, kind = label.split("_")
    return f"blocks.{layer}.hook_{kind}_out"


label, value = top[0]
quiet = min(((l, v) for l, v in zip(dla.labels, dla.values[0].tolist()) if l.endswith(("_attn", "_mlp"))),
            key=lambda item: abs(item[1]))
clean = logit_diff_with()
ablated_top = logit_diff_with([(hook_of(label), zero)])
ablated_quiet = logit_diff_with([(hook_of(quiet[0]), zero)])
print(f"clean {clean:.3f}; zeroing {label} (DLA {value:+.3f}) -> {ablated_top:.3f}; "
      f"zeroing {quiet[0]} (DLA {quiet[1]:+.3f}) -> {ablated_quiet:.3f}")
assert abs(clean - model_diff) < 1e-3
assert ablated_top < clean - 0.5 * value                       # most of its direct effect is causal
assert abs(ablated_quiet - clean) < abs(ablated_top - clean) / 3
