"""TransformerLens (``TransformerBridge``, ``HookedTransformer``) side of the generation verbs: the lens over
generated text and DoLa decoding. Re-exported by ``lens_plugins.adapters.transformer_lens``.

The lens over generated text generates, then runs one cached forward pass over prompt + continuation and
lenses the positions whose predictions are the generated tokens: for a causal model these are the residuals
each generation step computed (with a key-value cache), so this equals nnsight's per-step lens up to
rounding. DoLa re-runs the growing sequence once per generated token, reading only the candidate layers'
residuals at the last position, and scores with ``lens_plugins.core.dola``.
"""

import inspect
from collections.abc import Sequence
from typing import Optional, Union

import torch

from lens_plugins import generation
from lens_plugins.adapters.transformer_lens import decoder_for, hook_filter, hook_name, logit_lens
from lens_plugins.core import dola as core_dola
from lens_plugins.dola import DolaOutput, output
from lens_plugins.generation import GeneratedLens
from lens_plugins.logit_lens import check_context, check_prompts, eval_mode
from lens_plugins.models import context_length
from lens_plugins.typecheck import typechecked


def _prompt_tokens(model, text: Union[str, torch.Tensor]) -> torch.Tensor:
    """One prompt, as text or as ``[1, seq]`` token ids, within the model's context."""
    if isinstance(text, torch.Tensor):
        if text.dim() != 2 or text.shape[0] != 1 or text.shape[1] == 0:
            raise ValueError(f"generation takes one prompt: token ids of shape [1, seq], got {tuple(text.shape)}")
        tokens = text.long()
    elif not isinstance(text, str):
        raise TypeError("generation takes one prompt (a string or [1, seq] token ids); run a batch prompt by prompt")
    else:
        check_prompts(text)
        tokens = model.to_tokens(text, truncate=False)
    check_context(tokens.shape[1], context_length(model))
    return tokens


@typechecked
def run_generation_lens(model, text: Union[str, torch.Tensor], *, max_new_tokens: int = 10, **lens_kwargs) -> GeneratedLens:
    """Generate greedily from ``text`` (stopping at end-of-text), then lens every generated position in one
    cached forward pass; ``lens_kwargs`` go to ``logit_lens`` (``top_k``, ``targets``, ``reductions``, ...)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    generation.refuse_arguments(lens_kwargs, inspect.signature(logit_lens).parameters)
    tokens = _prompt_tokens(model, text)
    with eval_mode(model), torch.no_grad():
        # Without the key-value cache: TransformerBridge's cached generate (TL 4.3) drifted from Hugging Face's
        # greedy decoding after the first token on a tiny Llama; uncached, it matches token for token.
        sequence = model.generate(tokens, max_new_tokens=max_new_tokens, do_sample=False, verbose=False,
                                  use_past_kv_cache=False)
        check_context(sequence.shape[1], context_length(model))
        _, cache = model.run_with_cache(sequence, names_filter=hook_filter(model))
        positions = generation.generated_positions(tokens.shape[1], sequence.shape[1] - tokens.shape[1])
        result = logit_lens(cache, tokens=sequence, positions=positions, **lens_kwargs)
    return generation.from_lens_result(result, tokens.shape[1])


@typechecked
def dola_generate(
    model,
    text: Union[str, torch.Tensor],
    *,
    max_new_tokens: int = 10,
    layers: Union[str, Sequence[int]] = "high",
    alpha: float = 0.1,
    repetition_penalty: Optional[float] = None,
    premature_norm: bool = True,
    tied_embeddings: Optional[bool] = None,
) -> DolaOutput:
    """DoLa decoding of ``text`` (``lens_plugins.core.dola``), one forward pass per generated token; stops
    at the tokenizer's end-of-text token. ``tied_embeddings`` (for ``layers="low"``) defaults to the model
    config's ``tie_word_embeddings``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    tokens = _prompt_tokens(model, text)
    n = model.cfg.n_layers
    tied = bool(getattr(model.cfg, "tie_word_embeddings", False)) if tied_embeddings is None else tied_embeddings
    chosen = core_dola.candidate_layers(layers, n, tied)
    read_layers = sorted(set(chosen) | {n})
    hooks = dict(zip(read_layers, (hook_name(row) for row in core_dola.rows(read_layers, n))))
    decoder = decoder_for(model).tensors()
    eos = getattr(model.tokenizer, "eos_token_id", None)
    sequence = tokens[0].tolist()
    record = {"format": core_dola.FORMAT, "layers": chosen, "prompt_ids": list(sequence), "steps": []}
    with eval_mode(model), torch.no_grad():
        for _ in range(max_new_tokens):
            check_context(len(sequence), context_length(model))
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
