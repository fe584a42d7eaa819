"""The logit lens over generated text, inside one ``model.generate(...)`` trace: the part that runs where
the model runs.

A generation is a loop of forward passes: step 0 runs the whole prompt, step ``k`` runs only the token
chosen at step ``k - 1`` (the key-value cache holds the rest). At every step the lens reads the chosen rows
(``reader.plan``, read by ``reader.reader`` as in a plain trace) at the *last* position, which is the
position whose prediction becomes the step's token, then waits for that token (``model.generator.streamer``
receives it right after sampling) and runs the one lens pipeline (``pipeline.logit_lens``: checks, ``lens``,
streamed readout) on that position, scoring the chosen token as its "next token". Only the reductions are
kept, so a remote generation downloads ``O(steps x rows x top_k)`` numbers, never a distribution.

For a causal model the per-step lens is the teacher-forced lens of prompt + continuation at positions
``prompt_len - 1 .. prompt_len + steps - 2`` (the same residuals, computed with a cache instead of in one
pass), which is what the TransformerLens side computes and what the tests compare.

Torch and core only (nnsight inside the function), no decorators, plain containers out: shipped by source.
"""

import torch

from lens_plugins.core import pipeline, request
from lens_plugins.core.architectures import decoder_tensors
from lens_plugins.core.verification import resolve
from lens_plugins.core.defaults import TOP_K
from lens_plugins.core.errors import LensValueError
from lens_plugins.core.reductions import DEFAULT_LENS
from lens_plugins.core.trace.reader import plan, reader

FORMAT = "lens_plugins.generation/2"


def generation_lens(
    model,
    tracer,
    steps,
    top_k=TOP_K,
    targets=(),
    token_sets=None,
    reductions=DEFAULT_LENS,
    layers=None,
    resid_mid=False,
    sublayers=False,
    lens=None,
    paths=None,
    vocab_chunk=None,
    into=None,
):
    """Lens every step of ``with model.generate(prompt, max_new_tokens=steps) as tracer:``; call it first
    in the body, turn it into a ``GeneratedLens`` afterwards with ``lp.nnsight.generation_result(lens, model)``.
    The other parameters are ``core.trace.lens.logit_lens``'s (no ``positions``: the generated positions are decoded).

    ``steps`` must be the ``max_new_tokens`` of the generation. If the model stops early (an end-of-text
    token), nnsight warns that the next step never came and unwinds the body from inside this function,
    so it never returns: pass ``into=nnsight.save({})`` made before the call and read that (it holds every
    step that ran), or pin the length with ``min_new_tokens=steps``. One prompt per generation (a batch
    would need each row's own padding and stopping point).
    """
    import nnsight

    spec = resolve(model, paths)
    decoder = decoder_tensors(model, spec)
    every, chosen = plan(model, spec, layers, resid_mid, sublayers)
    # One decoded position per step: position 0 of the window [that position's token, the token chosen there].
    req = request.build(model.tokenizer, decoder.d_vocab, 1, top_k, None, targets, token_sets, reductions)
    pipeline.check_rows(req, chosen, every)
    saved = nnsight.save({}) if into is None else into
    saved.update({"format": FORMAT, "steps": [], "labels": [row.label for row in chosen], "request": req})
    prompt_ids = model.generator.streamer.output  # the streamer receives the prompt before the first forward
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise LensValueError(f"the generation lens takes one prompt, got input ids of shape {tuple(prompt_ids.shape)}")
    sequence = prompt_ids.cpu().long()
    saved["prompt_ids"] = sequence
    for step in tracer.iter[:steps]:
        # A fresh reader per step: a reader reads each module's input once, and every step is a new forward.
        stack = reader(model, spec)(chosen, [-1])  # [rows, 1, 1, d_model]: the step's position, read alone
        for _ in tracer.iter[step + 1]:  # the token this step chose (occurrence 0 was the prompt)
            token = model.generator.streamer.output
        sequence = torch.cat([sequence, token.cpu().long().reshape(1, 1)], dim=1)
        stats = pipeline.logit_lens(lambda rows, positions: stack, chosen, req, decoder, sequence[:, -2:],
                                    torch.ones(1, 2, dtype=torch.long), lens, vocab_chunk, 1)
        saved["steps"].append({name: value.cpu() for name, value in stats.items()})
        saved["sequence"] = sequence
    return saved

__all__ = ["FORMAT", "generation_lens"]
