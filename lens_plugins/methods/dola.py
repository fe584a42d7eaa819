"""``DolaOutput``: what a DoLa generation produced and which layer it contrasted at each step.

The scoring is ``lens_plugins.core.dola`` (torch only); the backends run it at every step,
TransformerLens by re-running the growing sequence (``lp.transformer_lens.dola_generate``), nnsight inside
one ``model.generate`` request (``lp.nnsight.dola_generate``, remote-capable).
"""

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins.core.dola import FORMAT
from lens_plugins.core.errors import LensTypeError
from lens_plugins.typecheck import typechecked


@typechecked
@dataclass
class DolaOutput:
    """``token_ids`` is prompt + continuation; per generated token, ``premature_layers`` is the contrasted
    layer (a hidden-state index: 0 = embeddings) and ``js`` the candidates' JS divergences (nats) from the
    mature distribution, in the order of ``candidate_layers``."""

    token_ids: Int[Tensor, "seq"]
    prompt_length: int
    candidate_layers: list[int]
    premature_layers: list[int]
    js: Float[Tensor, "step candidate"]
    text: str

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.prompt_length:].tolist()


def output(saved: dict, tokenizer) -> DolaOutput:
    """The ``DolaOutput`` of what ``core.dola_trace.dola`` (or the TransformerLens loop) recorded."""
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise LensTypeError(f"expected what dola(model, tracer, steps) returned inside model.generate(...), "
                        f"got {type(saved).__name__}")
    steps = saved["steps"]
    generated = [s["token"] for s in steps]
    prompt = list(saved["prompt_ids"])
    n_candidates = len(saved["layers"])
    return DolaOutput(
        token_ids=torch.tensor(prompt + generated, dtype=torch.long),
        prompt_length=len(prompt),
        candidate_layers=list(saved["layers"]),
        premature_layers=[s["layer"] for s in steps],
        js=torch.stack([s["js"].float() for s in steps]) if steps else torch.zeros(0, n_candidates),
        text=tokenizer.decode(generated),
    )

__all__ = ["DolaOutput", "output"]
