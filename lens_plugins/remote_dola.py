"""DoLa decoding inside one ``model.generate(...)`` trace: the part that runs where the model runs.

At every step of the generation this reads the residual at the last position at each candidate layer and
the last layer's output, runs ``core.dola.dola_step`` (the premature layer chosen through the streamed
readout's ``js_final``), and replaces the step's logits by a one-hot choice of DoLa's token, so that the
model's own greedy step takes it. Only the chosen tokens, premature layers and JS divergences come back:
a remote DoLa generation is one round trip and downloads ``O(steps x candidates)`` numbers.

Imports only torch (and nnsight inside the function) and returns plain containers; registered with
``nnsight.register`` by ``lens_plugins.adapters.nnsight`` so it ships by source.
"""

import torch

from lens_plugins import readout
from lens_plugins.architectures import decoder_tensors, get_path, layer_input, layer_output, resolve
from lens_plugins.core.dola import candidate_layers, dola_step

FORMAT = "lens_plugins.dola/1"


def dola(model, tracer, steps, layers="high", alpha=0.1, repetition_penalty=None, premature_norm=True,
         layer_path=None, final_norm=None, lm_head=None, into=None):
    """DoLa over ``with model.generate(prompt, max_new_tokens=steps, do_sample=False) as tracer:``; call it
    first in the body and read the result afterwards with ``lp.nnsight.dola_output(saved, model)``.

    ``layers`` are hidden-state indices of the premature candidates, or ``"low"`` / ``"high"``
    (``core.dola.candidate_layers``). Pass no ``repetition_penalty`` to ``generate`` itself: the step's
    logits are replaced by DoLa's choice, and the penalty belongs to DoLa's scores (``repetition_penalty=``
    here). ``layer_path`` / ``final_norm`` / ``lm_head`` are module paths for a family the table lacks.
    A generation that ends at an end-of-text token before ``steps`` unwinds the body from inside this
    function (nnsight's cut-short loop), so pass ``into=nnsight.save({})`` made before the call and read that.
    """
    import nnsight

    spec = resolve(model, layer_path, final_norm, lm_head)
    decoder = decoder_tensors(model, spec)
    blocks = get_path(model, spec["layers"])
    head = get_path(model, spec["lm_head"])
    n = len(blocks)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    chosen = candidate_layers(layers, n, tied)
    saved = nnsight.save({}) if into is None else into
    saved.update({"format": FORMAT, "layers": chosen, "steps": []})
    prompt_ids = model.generator.streamer.output  # the streamer receives the prompt before the first forward
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"DoLa decodes one prompt, got input ids of shape {tuple(prompt_ids.shape)}")
    seen = prompt_ids[0].tolist()
    saved["prompt_ids"] = list(seen)
    read = sorted(layer for layer in set(chosen) if layer < n)
    for _ in tracer.iter[:steps]:
        hidden = {layer: layer_input(blocks[layer].inputs)[0, -1] for layer in read}
        hidden[n] = layer_output(blocks[n - 1].output)[0, -1]
        with torch.no_grad():
            step = dola_step(torch.stack([hidden[layer] for layer in chosen]), hidden[n], chosen, n, decoder,
                             alpha, seen, repetition_penalty, premature_norm, readout)
        logits = head.output
        forced = torch.full_like(logits, float("-inf"))
        forced[:, -1, step["token"]] = 0.0
        head.output = forced
        seen.append(step["token"])
        saved["steps"].append({"token": step["token"], "layer": step["layer"], "js": step["js"]})
    return saved
