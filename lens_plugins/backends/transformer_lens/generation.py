"""The lens over generated text on TransformerLens (``TransformerBridge``, ``HookedTransformer``):
``run_generation_lens(model, text)``.

It generates, then runs one cached forward pass over prompt + continuation and lenses the positions whose
predictions are the generated tokens: for a causal model these are the residuals each generation step
computed (with a key-value cache), so this equals nnsight's per-step lens up to rounding.
"""

import inspect
from typing import Optional, Union

import torch

from lens_plugins.backends._common import check_token_ids, eval_mode, one_at_a_time
from lens_plugins.backends.transformer_lens.lens import logit_lens
from lens_plugins.backends.transformer_lens.reader import hook_filter, prompt_tokens
from lens_plugins.core.errors import LensValueError
from lens_plugins.methods import generation
from lens_plugins.methods.generation import GeneratedLens
from lens_plugins.progress import bar as progress_bar
from lens_plugins.typecheck import typechecked


@one_at_a_time
@typechecked
def run_generation_lens(model, text: Union[str, torch.Tensor], *, max_new_tokens: int = 10,
                        prepend_bos: Optional[bool] = None, progress: bool = False, **lens_kwargs) -> GeneratedLens:
    """Generate greedily from ``text`` (stopping at end-of-text), then lens every generated position in one
    cached forward pass; ``lens_kwargs`` go to ``logit_lens`` (``top_k``, ``targets``, ``reductions``, ...).
    Text is tokenized with ``prepend_bos`` as in ``run_logit_lens``; token ids run as given.

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer``.
        text: one prompt, as text or ids ``[1, seq]``.
        max_new_tokens: greedy steps.
        prepend_bos: as ``run_logit_lens``.
        progress: a progress bar over generated tokens (``lens_plugins.progress``; off by default).
        **lens_kwargs: every option of ``logit_lens`` (``top_k``, ``targets``, ``layers``, ``lens``, ...).

    Returns:
        A ``GeneratedLens``: a ``LensResult`` over the positions that predicted each generated token.

    Raises:
        LensValueError: more than one prompt, or a prompt plus ``max_new_tokens`` longer than the context.
    """
    check_token_ids(model, text)
    if max_new_tokens < 1:
        raise LensValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    generation.refuse_arguments(lens_kwargs, inspect.signature(logit_lens).parameters)
    tokens = prompt_tokens(model, text, max_new_tokens, prepend_bos)
    with eval_mode(model), torch.no_grad(), progress_bar(progress, max_new_tokens, "generation lens", "token") as shown:
        # Uncached, every generation step is one whole forward pass: the embedding hook counts them.
        def step(activation, hook):  # returns None: the activation is left as it is
            shown.update(1)

        steps = [("hook_embed", step)] if progress else []
        # Without the key-value cache: TransformerBridge's cached generate (TL 4.3) drifted from Hugging Face's
        # greedy decoding after the first token on a tiny Llama; uncached, it matches token for token.
        with model.hooks(fwd_hooks=steps):
            sequence = model.generate(tokens, max_new_tokens=max_new_tokens, do_sample=False, verbose=False,
                                      use_past_kv_cache=False)
        _, cache = model.run_with_cache(sequence, names_filter=hook_filter(model))
        positions = generation.generated_positions(tokens.shape[1], sequence.shape[1] - tokens.shape[1])
        result = logit_lens(cache, tokens=sequence, positions=positions, **lens_kwargs)
    return generation.from_lens_result(result, tokens.shape[1])

__all__ = ["run_generation_lens"]
