"""The DecoderLens of encoder-decoder models (T5, BART) in nnsight: the in-trace ``decoder_lens``
(``core/trace/decoder_lens.py``), its labelling ``decoder_lens_result`` and the one-call ``run_decoder_lens``."""

from collections.abc import Sequence
from typing import Optional, Union

import torch

from lens_plugins.backends._common import eval_mode, example_ids, one_at_a_time, unwrap
from lens_plugins.backends.nnsight._run import remote_error
from lens_plugins.core import decoder_lens as core_decoder_lens
from lens_plugins.core.architectures import get_path
from lens_plugins.core.errors import LensTypeError
from lens_plugins.core.reductions import DEFAULT_LENS as DEFAULT_LENS_REDUCTIONS
from lens_plugins.core.trace.decoder_lens import decoder_lens
from lens_plugins.core.request import check_reductions
from lens_plugins.methods.lens import DEFAULT_TOP_K, LensRequest, assemble
from lens_plugins.methods.result import LensResult
from lens_plugins.typecheck import typechecked


@typechecked
def decoder_lens_result(lens: dict, model) -> LensResult:
    """The ``LensResult`` of a saved DecoderLens: rows are encoder layers ("embed", "1_pre", ...,
    "<L-1>_post", the model's own encoder output), positions are decoder positions."""
    if not isinstance(lens, dict) or lens.get("format") != core_decoder_lens.FORMAT:
        raise LensTypeError(f"expected what decoder_lens(model, ...) returned inside a trace, got {type(lens).__name__}")
    return assemble(lens["stats"], LensRequest.from_dict(lens["request"]), lens["labels"], lens["token_ids"].long(),
                    getattr(model, "tokenizer", model), lens["attention_mask"].long())


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
    remote: Union[bool, str] = False,
    backend=None,
    prepend_bos: Optional[bool] = None,
) -> LensResult:
    """The DecoderLens of one example: ``input_ids`` for the encoder, ``decoder_input_ids`` for the decoder
    (strings are tokenized; a 1 x seq tensor is used as is), traced as one batch of ``n_encoder_layers + 1``
    copies, locally or remotely; text is tokenized with ``prepend_bos`` as in ``run_logit_lens``."""
    spec = core_decoder_lens.encoder_decoder_spec(model)
    n = len(get_path(model, spec["encoder_layers"]))
    encoder_ids, decoder_ids = (example_ids(model.tokenizer, x, name, prepend_bos) for x, name in
                                ((input_ids, "input_ids"), (decoder_input_ids, "decoder_input_ids")))
    trace_kwargs = {"remote": remote} if backend is None else {"backend": backend}
    try:
        with eval_mode(unwrap(model)), torch.no_grad(), model.trace(
            encoder_ids.repeat(n + 1, 1), decoder_input_ids=decoder_ids.repeat(n + 1, 1), **trace_kwargs
        ):
            lens = decoder_lens(model, top_k=top_k, targets=list(targets), token_sets=token_sets,
                                                  positions=positions, reductions=check_reductions(reductions))
    except Exception as error:  # noqa: BLE001 - re-raised with what happened, unless it is ours
        raise remote_error(error, remote, backend) from error
    return decoder_lens_result(lens, model)

__all__ = ["decoder_lens_result", "run_decoder_lens"]
