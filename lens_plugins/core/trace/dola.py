"""DoLa decoding inside one ``model.generate(...)`` trace: the part that runs where the model runs.

At every step of the generation this reads the candidate layers' and the final layer's residuals at the
last position (``dola.rows`` read by ``reader.reader``, as any lens row), runs ``dola.dola_step`` (the
premature layer chosen through the streamed readout's ``js_final``), and replaces the step's logits by a
one-hot choice of DoLa's token, so that the model's own greedy step takes it. Only the chosen tokens,
premature layers and JS divergences come back: a remote DoLa generation is one round trip and downloads
``O(steps x candidates)`` numbers.

Torch and core only (nnsight inside the function), no decorators, plain containers out: shipped by source.
"""

import torch

from lens_plugins.core import dola as dola_core
from lens_plugins.core.architectures import decoder_tensors, get_path
from lens_plugins.core.verification import resolve
from lens_plugins.core.errors import LensValueError
from lens_plugins.core.trace.reader import reader


def dola(model, tracer, steps, layers="high", alpha=0.1, repetition_penalty=None, premature_norm=True, paths=None,
         into=None, tied_embeddings=None):
    """DoLa over ``with model.generate(prompt, max_new_tokens=steps, do_sample=False) as tracer:``; call it
    first in the body and read the result afterwards with ``lp.nnsight.dola_output(saved, model)``.

    ``layers`` are hidden-state indices of the premature candidates, or ``"low"`` / ``"high"``
    (``dola.candidate_layers``). Pass no ``repetition_penalty`` to ``generate`` itself: the step's logits
    are replaced by DoLa's choice, and the penalty belongs to DoLa's scores (``repetition_penalty=`` here).
    ``tied_embeddings`` (for ``layers="low"``) defaults to the config's ``tie_word_embeddings``. ``paths``
    holds module paths for a family the table lacks. A generation that ends at an end-of-text token
    before ``steps`` unwinds the body from inside this function (nnsight's cut-short loop), so pass
    ``into=nnsight.save({})`` made before the call and read that.
    """
    import nnsight

    dola_core.check_options(alpha, repetition_penalty)
    spec = resolve(model, paths)
    decoder = decoder_tensors(model, spec)
    head = get_path(model, spec["lm_head"])
    n = len(get_path(model, spec["layers"]))
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) if tied_embeddings is None else tied_embeddings
    chosen = dola_core.candidate_layers(layers, n, tied)
    read_layers = sorted(set(chosen) | {n})  # stream order: the reader reads modules in forward order
    read_rows = dola_core.rows(read_layers, n)
    saved = nnsight.save({}) if into is None else into
    saved.update({"format": dola_core.FORMAT, "layers": chosen, "steps": []})
    prompt_ids = model.generator.streamer.output  # the streamer receives the prompt before the first forward
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise LensValueError(f"DoLa decodes one prompt, got input ids of shape {tuple(prompt_ids.shape)}")
    seen = prompt_ids[0].tolist()
    saved["prompt_ids"] = list(seen)
    for _ in tracer.iter[:steps]:
        # A fresh reader per step: a reader reads each module's input once, and every step is a new forward.
        stack = reader(model, spec)(read_rows, [-1])[:, 0, 0]  # [read layers, d_model]: the step's position alone
        hidden = dict(zip(read_layers, stack))
        with torch.no_grad():
            step = dola_core.dola_step(torch.stack([hidden[layer] for layer in chosen]), hidden[n], chosen, n,
                                       decoder, alpha, seen, repetition_penalty, premature_norm)
        logits = head.output
        forced = torch.full_like(logits, float("-inf"))
        forced[:, -1, step["token"]] = 0.0
        head.output = forced
        seen.append(step["token"])
        saved["steps"].append({"token": step["token"], "layer": step["layer"], "js": step["js"]})
    return saved

__all__ = ["dola"]
