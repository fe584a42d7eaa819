"""TransformerLens (``TransformerBridge`` on T5 / BART) side of the DecoderLens; the method is described in
``lens_plugins.core.decoder_lens``. The same batch of ``n_encoder_layers + 1`` copies runs with hooks
instead of an nnsight trace: ``encoder_blocks.{i}.hook_in`` records the encoder rows, the last encoder
block's ``hook_out`` hands copy ``i`` row ``i``, and the last decoder block's ``hook_out`` is decoded."""

from collections.abc import Sequence
from typing import Optional, Union

import torch

from lens_plugins.backends._common import eval_mode, example_ids, one_at_a_time
from lens_plugins.backends.transformer_lens.reader import hf_tokenizer
from lens_plugins.core.architectures import decoder_tensors, get_path
from lens_plugins.core.decoder_lens import decoder_lens_stats, encoder_decoder_spec
from lens_plugins.core.reductions import DEFAULT_LENS as DEFAULT_LENS_REDUCTIONS
from lens_plugins.core.request import check_reductions
from lens_plugins.methods.lens import DEFAULT_TOP_K, LensRequest, assemble
from lens_plugins.methods.result import LensResult
from lens_plugins.typecheck import typechecked


def _unwrapped(module):
    """The Hugging Face module under a bridge component (booting a bridge wraps the HF module tree)."""
    return getattr(module, "original_component", None) or getattr(module, "_original_component", None) or module


@one_at_a_time
@typechecked
def run_decoder_lens(
    model,
    input_ids: Union[str, torch.Tensor],
    decoder_input_ids: Union[str, torch.Tensor],
    *,
    top_k: int = DEFAULT_TOP_K,
    targets: Sequence[Union[str, int]] = (),
    token_sets: Optional[dict] = None,
    positions: Optional[Union[int, Sequence[int]]] = None,
    reductions: Sequence[str] = DEFAULT_LENS_REDUCTIONS,
    prepend_bos: Optional[bool] = None,
) -> LensResult:
    """The DecoderLens of one example (text, or ``[1, seq]`` encoder and decoder ids) on a TransformerBridge;
    text is tokenized with ``prepend_bos`` as in ``run_logit_lens``."""
    input_ids, decoder_input_ids = (example_ids(hf_tokenizer(model), x, name, prepend_bos) for x, name in
                                    ((input_ids, "input_ids"), (decoder_input_ids, "decoder_input_ids")))
    hf = model.original_model
    spec = encoder_decoder_spec(hf)
    n = len(get_path(hf, spec["encoder_layers"]))
    n_dec = len(get_path(hf, spec["layers"]))
    rows = []

    def record(value, hook):
        rows.append(value[len(rows)].detach().clone())

    def replace(value, hook):
        rows.append(value[n].detach().clone())
        return torch.stack(rows).to(value.dtype)

    captured = {}

    def read(value, hook):
        captured["resid"] = value.detach()

    hooks = [(f"encoder_blocks.{i}.hook_in", record) for i in range(n)]
    hooks += [(f"encoder_blocks.{n - 1}.hook_out", replace), (f"decoder_blocks.{n_dec - 1}.hook_out", read)]
    with eval_mode(model), torch.no_grad():
        logits = model.run_with_hooks(input_ids.repeat(n + 1, 1), decoder_input=decoder_input_ids.repeat(n + 1, 1),
                                      fwd_hooks=hooks)
    decoder = decoder_tensors(_Unwrapped(hf), spec).detached()
    with torch.no_grad():
        lens = decoder_lens_stats(captured["resid"], decoder, model.tokenizer, decoder_input_ids, n, top_k,
                                  list(targets), token_sets, positions, check_reductions(reductions), own_logits=logits[n])
    return assemble(lens["stats"], LensRequest.from_dict(lens["request"]), lens["labels"], lens["token_ids"],
                    model.tokenizer, lens["attention_mask"])


class _Unwrapped:
    """Attribute access through a booted bridge's HF model that yields the original HF modules."""

    def __init__(self, module):
        self._module = _unwrapped(module)
        self.config = getattr(self._module, "config", None)

    def __getattr__(self, name):
        value = getattr(self._module, name)
        return _Unwrapped(value) if isinstance(value, torch.nn.Module) else value

    def __getitem__(self, index):
        return _Unwrapped(self._module[index])

__all__ = ["run_decoder_lens"]
