"""The logit lens over generated text, inside one ``model.generate(...)`` trace: the part that runs where
the model runs.

A generation is a loop of forward passes: step 0 runs the whole prompt, step ``k`` runs only the token
chosen at step ``k - 1`` (the key-value cache holds the rest). At every step the lens reads each decoder
layer's input and the last layer's output at the *last* position, which is the position whose prediction
becomes the step's token, then waits for that token (``model.generator.streamer`` receives it right after
sampling) and reduces the stack with the streamed readout, scoring the chosen token as the position's
"next token". Only the reductions are kept, so a remote generation downloads ``O(steps x rows x top_k)``
numbers, never a distribution.

For a causal model the per-step lens is the teacher-forced lens of prompt + continuation at positions
``prompt_len - 1 .. prompt_len + steps - 2`` (the same residuals, computed with a cache instead of in one
pass), which is what the TransformerLens side computes and what the tests compare.

Like ``remote``, this module imports only torch (and nnsight inside the function), carries no decorators
and returns plain containers; ``lens_plugins.adapters.nnsight`` registers it so it ships by source.
"""

import torch

from lens_plugins.architectures import decoder_tensors, get_path, layer_input, layer_output, resolve
from lens_plugins.prompt import (
    DEFAULT_LENS_REDUCTIONS, check_reductions, readout_reductions, single_token_id, target_columns,
)
from lens_plugins.readout import lens_statistics

FORMAT = "lens_plugins.generation/1"


def generation_lens(
    model,
    tracer,
    steps,
    top_k=10,
    targets=(),
    reductions=DEFAULT_LENS_REDUCTIONS,
    layers=None,
    final_norm=None,
    lm_head=None,
    vocab_chunk=4096,
    into=None,
):
    """Lens every step of ``with model.generate(prompt, max_new_tokens=steps) as tracer:``; call it first
    in the body, turn it into a ``LensResult`` afterwards with ``lp.nnsight.generation_result(lens, model)``.

    ``steps`` must be the ``max_new_tokens`` of the generation. If the model stops early (an end-of-text
    token), nnsight warns that the next step never came and unwinds the body from inside this function,
    so it never returns: pass ``into=nnsight.save({})`` made before the call and read that (it holds every
    step that ran), or pin the length with ``min_new_tokens=steps``. One prompt per generation (a batch
    would need each row's own padding and stopping point).
    """
    import nnsight

    reductions = check_reductions(reductions)
    spec = resolve(model, layers, final_norm, lm_head)
    decoder = decoder_tensors(model, spec)
    d_vocab = decoder["W_U"].shape[1]
    user_ids = [single_token_id(model.tokenizer, t, d_vocab) for t in targets]
    blocks = get_path(model, spec["layers"])
    n = len(blocks)
    saved = nnsight.save({}) if into is None else into
    saved.update({
        "format": FORMAT,
        "steps": [],
        "labels": ["embed"] + [f"{layer}_pre" for layer in range(1, n)] + [f"{n - 1}_post"],
        "reductions": list(reductions),
        "target_names": [t if isinstance(t, str) else None for t in targets],
        "target_ids": user_ids,
    })
    prompt_ids = model.generator.streamer.output  # the streamer receives the prompt before the first forward
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"the generation lens takes one prompt, got input ids of shape {tuple(prompt_ids.shape)}")
    sequence = prompt_ids.cpu().long()
    saved["prompt_ids"] = sequence
    for step in tracer.iter[:steps]:
        rows = [layer_input(blocks[layer].inputs)[:, -1] for layer in range(n)]
        rows.append(layer_output(blocks[n - 1].output)[:, -1])
        stack = torch.stack([row.float() for row in rows])  # [rows, 1, d_model]
        for _ in tracer.iter[step + 1]:  # the token this step chose (occurrence 0 was the prompt)
            token = model.generator.streamer.output
        sequence = torch.cat([sequence, token.cpu().long().reshape(1, 1)], dim=1)
        position = sequence.shape[1] - 2
        per_token = target_columns(sequence, torch.ones_like(sequence), [position], reductions, user_ids)
        with torch.no_grad():
            stats = lens_statistics(
                stack.detach(), **decoder, top_k=top_k, target_ids=per_token, vocab_chunk=vocab_chunk,
                token_chunk=1, reductions=readout_reductions(reductions, len(user_ids)),
            )
        saved["steps"].append({name: value.cpu() for name, value in stats.items()})
        saved["sequence"] = sequence
    return saved
