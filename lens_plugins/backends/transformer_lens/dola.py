"""DoLa decoding on TransformerLens (``run_dola(model, text)``): the growing sequence re-run once per
generated token, reading only the candidate layers' residuals at the last position, scored by
``lens_plugins.core.dola`` (the same scoring nnsight runs inside one ``model.generate``)."""

from collections.abc import Sequence
from typing import Optional, Union

import torch

from lens_plugins.backends._common import check_token_ids, eval_mode, one_at_a_time
from lens_plugins.backends.transformer_lens.reader import hook_name, prompt_tokens
from lens_plugins.backends.transformer_lens.verification import decoder_for
from lens_plugins.core import dola as core_dola
from lens_plugins.core.errors import LensValueError
from lens_plugins.methods.dola import DolaOutput, output
from lens_plugins.typecheck import typechecked


@one_at_a_time
@typechecked
def run_dola(
    model,
    text: Union[str, torch.Tensor],
    *,
    max_new_tokens: int = 10,
    layers: Union[str, Sequence[int]] = "high",
    alpha: float = 0.1,
    repetition_penalty: Optional[float] = None,
    premature_norm: bool = True,
    tied_embeddings: Optional[bool] = None,
    prepend_bos: Optional[bool] = None,
) -> DolaOutput:
    """DoLa decoding of ``text`` (``lens_plugins.core.dola``), one forward pass per generated token; stops
    at the tokenizer's end-of-text token. ``tied_embeddings`` (for ``layers="low"``) defaults to the model
    config's ``tie_word_embeddings``. Text is tokenized with ``prepend_bos`` as in ``run_logit_lens``; token
    ids run as given.

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer``.
        text: one prompt, as text or ids.
        max_new_tokens: tokens to decode.
        layers: candidate premature layers: ``"low"``, ``"high"`` (transformers 4.x's buckets) or
            ``output_hidden_states`` indices.
        alpha: the adaptive plausibility threshold (``p >= alpha * max p``).
        repetition_penalty: transformers' penalty on DoLa's scores; ``None`` for none.
        premature_norm: decode premature layers through the final norm (default); ``False`` is transformers 4.x.
        tied_embeddings: override the tied-embedding detection.
        prepend_bos: as ``run_logit_lens``.

    Returns:
        A ``DolaOutput``: the text and ids, the premature layer chosen at each step and the JS divergences.

    Raises:
        LensValueError: bad layers, or a prompt plus ``max_new_tokens`` longer than the context.
    """
    check_token_ids(model, text)
    if max_new_tokens < 1:
        raise LensValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    tokens = prompt_tokens(model, text, max_new_tokens, prepend_bos)
    n = model.cfg.n_layers
    tied = bool(getattr(model.cfg, "tie_word_embeddings", False)) if tied_embeddings is None else tied_embeddings
    chosen = core_dola.candidate_layers(layers, n, tied)
    core_dola.check_options(alpha, repetition_penalty)
    read_layers = sorted(set(chosen) | {n})
    hooks = dict(zip(read_layers, (hook_name(row) for row in core_dola.rows(read_layers, n))))
    decoder = decoder_for(model)
    eos = getattr(model.tokenizer, "eos_token_id", None)
    sequence = tokens[0].tolist()
    record = {"format": core_dola.FORMAT, "layers": chosen, "prompt_ids": list(sequence), "steps": []}
    with eval_mode(model), torch.no_grad():
        for _ in range(max_new_tokens):
            _, cache = model.run_with_cache(torch.tensor([sequence], device=tokens.device),
                                            names_filter=list(dict.fromkeys(hooks.values())))
            last = {layer: cache[hook][0, -1] for layer, hook in hooks.items()}
            step = core_dola.dola_step(torch.stack([last[layer] for layer in chosen]), last[n], chosen, n, decoder,
                                       alpha, sequence, repetition_penalty, premature_norm)
            sequence.append(step["token"])
            record["steps"].append({"token": step["token"], "layer": step["layer"], "js": step["js"]})
            if step["token"] == eos:
                break
    return output(record, model.tokenizer)

__all__ = ["run_dola"]
