# %% [markdown]
# # 02 · The lens inside an nnsight trace, next to an intervention; then remotely
#
# nnsight runs the model and lets you read and *write* any activation inside a `with model.trace(...)` block.
# `lp.nnsight.logit_lens(model, ...)` is one more line in that block: it decodes every layer where the model
# runs and saves only the reductions. Here it watches an activation patch spread through the layers, and
# then the same trace runs remotely: on NDIF when it is configured, else on a local NDIF if one answers, else
# in nnsight's local rehearsal of a remote run (`remote="local"`), and the notebook says which it did.
#
# **Setup** (from the repository root): `make venv`, then open this notebook with the `.venv` kernel
# (e.g. `.venv/bin/pip install jupyterlab && .venv/bin/jupyter lab tutorials/`). For NDIF, set `NDIF_API_KEY`
# (and `NDIF_HOST` for another server, e.g. a local NDIF from `make ndif-up`) before starting Jupyter.

# %%
import os

import torch

import lens_plugins as lp

model = lp.load_default_model(backend="nnsight")  # an nnsight model around SmolLM2-135M, eager attention
clean, source = "The capital of France is", "The capital of Italy is"
tokens = model.tokenizer(clean)["input_ids"]
assert len(tokens) == len(model.tokenizer(source)["input_ids"])   # same length: the positions line up
subject = tokens.index(model.tokenizer(" France")["input_ids"][0])
print(f"{len(tokens)} tokens; the subject ' France' is at position {subject}")

# %% [markdown]
# ## The lens of a clean run
#
# Inside the trace, `logit_lens` reads each layer's input and the last layer's output; `lp.nnsight.result`
# turns what the trace saved into the same `LensResult` a TransformerLens cache gives.

# %%
targets = [" Paris", " Rome"]
with model.trace(clean):
    lens = lp.nnsight.logit_lens(model, top_k=5, targets=targets)
before = lp.nnsight.logit_lens_result(lens, model)
print(before)

# %% [markdown]
# ## Patch a layer, watch later rows change
#
# Activation patching: run "... Italy is", save the output of block `L` at the subject's position, and write it
# into the run of "... France is". nnsight 0.8 with transformers 5 gives a decoder layer's `.output` as a
# tensor. The lens goes in its own empty `tracer.invoke()`, which sees the batch *after* every invoke's edits.
#
# Rows that are computed before the patch (the embeddings up to `L_pre`, the input of block `L`) are exactly
# the clean ones; from `L+1_pre` on the subject position carries Italy, and the last position, which reads it
# through attention, changes its answer.

# %%
L = 8
with model.trace(source):
    italy = model.model.layers[L].output[:, subject].save()

with model.trace() as tracer:
    with tracer.invoke(clean):
        model.model.layers[L].output[:, subject] = italy
    with tracer.invoke():
        lens = lp.nnsight.logit_lens(model, top_k=5, targets=targets)
after = lp.nnsight.logit_lens_result(lens, model)

for label in list(dict.fromkeys(before.labels[L - 2 :: 3] + [before.labels[-1]])):
    r = before.row_index(label)
    print(f"{label:>8}  last position top-1: clean {before.top_tokens(-1)[label][0][0]!r:>10}  "
          f"patched {after.top_tokens(-1)[label][0][0]!r:>10}   "
          f"rank of ' Rome': clean {before.rank_of(' Rome')[r, 0, -1]:>5}, patched {after.rank_of(' Rome')[r, 0, -1]:>5}")

untouched = before.row_index(f"{L}_pre")
assert torch.allclose(before.top_logprobs[: untouched + 1], after.top_logprobs[: untouched + 1], atol=1e-5)
assert torch.equal(before.top_ids[: untouched + 1], after.top_ids[: untouched + 1])
assert not torch.allclose(before.top_logprobs[untouched + 1 :, 0, -1], after.top_logprobs[untouched + 1 :, 0, -1])
assert before.top_tokens(-1)[before.labels[-1]][0][0] == " Paris"
assert after.rank_of(" Rome")[-1, 0, -1] < before.rank_of(" Rome")[-1, 0, -1]
lp.plot.trajectory_figure(after, kind="rank").show()

# %% [markdown]
# ## The same trace, remotely
#
# `remote=True` ships the trace to the NDIF host in `nnsight.CONFIG.API.HOST` (the `NDIF_HOST` variable);
# the lens code travels by source and imports only torch, and only the reductions come back. A remote trace
# runs on a model the server loads, named by `lp.nnsight.remote_model` (its weights never load here). Which one:
# - `NDIF_API_KEY` set (or a key in nnsight's config): NDIF, with the model named by `LENS_PLUGINS_NDIF_MODEL`
#   (default `HuggingFaceTB/SmolLM2-135M-Instruct`, which must be deployed there; its tokenizer is fetched from
#   the model hub, so this needs network). Its weights are the original ones, not the embedded copy, so only the
#   answer is compared below;
# - else, if a server answers `/status` on the configured host (a local NDIF: `make ndif-up`, then
#   `NDIF_HOST=http://127.0.0.1:18001` before starting Jupyter): that server, loading the embedded model's own
#   directory, so the numbers must match the local trace;
# - else `remote="local"`: nnsight serialises the trace and runs it here as a server would, which checks that
#   everything the trace needs can be shipped; again the numbers must match.

# %%
import httpx
import nnsight

from lens_plugins.models import default_model_dir

host = nnsight.CONFIG.API.HOST
if nnsight.CONFIG.API.APIKEY or os.environ.get("NDIF_API_KEY"):
    remote, name = True, os.environ.get("LENS_PLUGINS_NDIF_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
    where = f"NDIF at {host} (API key configured), model {name}"
else:
    try:
        httpx.get(f"{host}/status", timeout=3).raise_for_status()
        remote, name = True, str(default_model_dir())
        where = f"the NDIF server answering at {host} (no API key: a local NDIF), model {name}"
    except httpx.HTTPError as error:
        remote, name = "local", None
        where = f"nnsight's local rehearsal, remote='local' (no API key; {host} did not answer: {type(error).__name__})"
print("running the lens on", where)

remote_lm = model if name is None else lp.nnsight.remote_model(name)
with remote_lm.trace(clean, remote=remote):
    lens = lp.nnsight.logit_lens(remote_lm, top_k=5, targets=targets)
shipped = lp.nnsight.logit_lens_result(lens, remote_lm)
print(shipped.top_tokens(-1)[shipped.labels[-1]])
assert shipped.top_tokens(-1)[shipped.labels[-1]][0][0] == " Paris"
if name is None or name == str(default_model_dir()):   # the same weights: the same numbers as the local trace
    assert torch.equal(shipped.top_ids, before.top_ids)
    assert torch.allclose(shipped.top_logprobs, before.top_logprobs, atol=1e-4)
shipped.plot("prob").show()
