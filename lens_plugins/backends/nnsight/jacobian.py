"""The Jacobian lens on nnsight: a lens ``Edit`` inside your trace (``jacobian_edit``, remote too) and its
measured effect (``run_jacobian_edit``). Fitting reads the wrapped Hugging Face model directly
(``training.jacobian_lens``); the lens itself needs nothing here: it is affine, so ``lens=`` ships it."""

from typing import Optional, Union

from lens_plugins.backends._common import one_at_a_time
from lens_plugins.backends.nnsight._run import trace
from lens_plugins.core.trace import jacobian as trace_jacobian
from lens_plugins.core.trace.jacobian import edited_logits
from lens_plugins.lenses.jacobian import Edit
from lens_plugins.methods.jacobian import EditResult, edit_result


def jacobian_edit(model, edit: Edit, *, paths: Optional[dict] = None) -> list[int]:
    """Inside ``with model.trace(...)``: apply ``edit`` to the block outputs it names (call it before reading
    anything downstream of them). Returns the blocks edited."""
    return trace_jacobian.jacobian_edit(model, edit.specs, paths)


@one_at_a_time
def run_jacobian_edit(model, prompt: Union[str, list[str]], edit: Edit, *, remote: Union[bool, str] = False, backend=None,
             paths: Optional[dict] = None, prepend_bos: Optional[bool] = None) -> EditResult:
    """Trace ``prompt`` without and with ``edit`` (two requests when remote) and return what it did to the
    model's next-token distribution at the last position (``EditResult``, as TransformerLens's ``run_jacobian_edit``)."""
    def run(specs):
        return trace(model, prompt, remote, backend, lambda: edited_logits(model, specs, paths), "left", prepend_bos)

    return edit_result(edit, run({}), run(edit.specs), model.tokenizer)

__all__ = ["jacobian_edit", "run_jacobian_edit"]
