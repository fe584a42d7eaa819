"""Activation patching on nnsight models, locally or on NDIF: ``lp.nnsight.run_patching``, the same verb and
options as ``lp.transformer_lens.run_patching``.

The sweep is planned here before any trace (the row plan from the local module tree, the tokens, the metric),
so bad input is refused before anything is sent. Then one trace per batch ``[source, target, target x k]``
runs ``core/trace/activation_patching.patch_and_measure``, which patches, reads and reduces where the model
runs: a remote request (``remote=True``) carries the cells and the lens's tensors and downloads only the
metric values (and the cone's), never an activation. Inside your own trace, call ``patch_and_measure``
directly: it ships by source with core.
"""

from collections.abc import Sequence
from typing import Optional, Union

import torch

from lens_plugins.backends._common import (
    check_context,
    check_prompts,
    context_length,
    eval_mode,
    one_at_a_time,
    prompt_ids,
    unwrap,
)
from lens_plugins.backends.nnsight._run import check_remote, remote_error, shippable
from lens_plugins.core import architectures, verification
from lens_plugins.core import rows as row_plan
from lens_plugins.core.trace.activation_patching import patch_and_measure
from lens_plugins.methods.activation_patching import (
    Answers,
    PatchingResult,
    RowSpec,
    Runner,
    lens_name,
    pair_ids,
    plan,
    run,
)
from lens_plugins.typecheck import typechecked


class _Runner(Runner):
    def __init__(self, model, request, lens, trace_kwargs, paths, vocab_chunk, token_chunk):
        self.model, self.request, self.lens = model, request, lens
        self.trace_kwargs, self.paths = trace_kwargs, paths
        self.chunks = dict(vocab_chunk=vocab_chunk, token_chunk=token_chunk)

    # The trace body names only plain values and shipped functions: a remote trace pickles what it names.
    def measure(self, tokens, cell_labels, cell_positions, answer_id, foil_id):
        model, request, lens, paths, chunks = self.model, self.request, self.lens, self.paths, self.chunks
        labels, positions, read_labels = list(cell_labels), list(cell_positions), list(request.read_labels)
        metric, metric_position = request.metric, request.metric_position
        with torch.no_grad(), model.trace(tokens, **self.trace_kwargs):
            saved = patch_and_measure(model, labels, positions, metric_position, metric, answer_id, foil_id, lens,
                                      read_labels, paths, **chunks)
        return saved


@one_at_a_time
@typechecked
def run_patching(
    model,
    source: Union[str, Sequence[str]],
    target: Union[str, Sequence[str]],
    *,
    answer: Answers,
    foil: Optional[Answers] = None,
    metric: str = "logit_diff",
    layers: Optional[Sequence[RowSpec]] = None,
    resid_mid: bool = False,
    positions: Optional[Union[int, Sequence[int]]] = None,
    metric_position: int = -1,
    lens=None,
    cone: Optional[bool] = None,
    batch_size: int = 16,
    remote: Union[bool, str] = False,
    backend=None,
    paths: Optional[dict] = None,
    vocab_chunk: Optional[int] = None,
    token_chunk: Optional[int] = None,
    prepend_bos: Optional[bool] = None,
) -> PatchingResult:
    """Patch ``source`` into ``target`` at every chosen residual cell of an nnsight ``model``; the options are
    those of ``lp.transformer_lens.run_patching``. ``remote`` / ``backend`` go to every ``model.trace`` (one per
    batch of cells); an affine ``lens`` travels as its tensors (``lp.nnsight.lens_tensors``); ``paths`` holds
    module paths for a family ``core.architectures`` does not know."""
    check_remote(model, remote, backend)
    sources, targets = check_prompts(source), check_prompts(target)
    tokenizer = model.tokenizer
    source_ids, target_ids = pair_ids([prompt_ids(tokenizer, s, prepend_bos) for s in sources],
                                      [prompt_ids(tokenizer, t, prepend_bos) for t in targets])
    check_context(source_ids.shape[1], context_length(model), what="the prompts")
    hf = unwrap(model)
    spec = verification.resolve(hf, paths)
    n_layers = len(architectures.get_path(hf, spec["layers"]))
    every = row_plan.plan(n_layers, resid_mid, False, architectures.is_parallel(hf, spec))
    use_cone = lens is not None if cone is None else cone
    request = plan(every, source_ids.shape[1], len(sources), tokenizer, architectures.decoder_tensors(hf, spec).d_vocab,
                   layers=layers, positions=positions, metric=metric, answer=answer, foil=foil,
                   metric_position=metric_position, cone=use_cone, batch_size=batch_size)
    name = lens_name(lens, use_cone)
    if use_cone:
        lens = shippable(model, lens, remote, backend, resid_mid=resid_mid)
    trace_kwargs = {"remote": remote} if backend is None else {"backend": backend}
    try:
        with eval_mode(hf):
            runner = _Runner(model, request, lens, trace_kwargs, paths, vocab_chunk, token_chunk)
            return run(runner, request, source_ids, target_ids, tokenizer, name)
    except Exception as error:  # noqa: BLE001 - re-raised with what happened if it is a remote failure
        raise remote_error(error, remote, backend) from error

__all__ = ["run_patching"]
