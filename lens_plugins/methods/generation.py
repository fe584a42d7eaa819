"""``GeneratedLens``: the logit lens over a generated continuation, labelled by the generated tokens.

Both backends produce the same thing: the lens at the positions whose predictions *are* the generated
tokens, ``prompt_length - 1 .. prompt_length + steps - 2`` (the last prompt token predicts the first
generated token, and so on; the last generated token predicts nothing, so it has no column). Each column is
labelled with the token generated there, which is also that position's ``next_token``: under greedy
decoding the final row's top-1 is the generated token, rank 1.

TransformerLens computes it by teacher forcing (generate, then one cached forward over prompt +
continuation); nnsight computes it step by step inside ``model.generate`` (``core.generation``). For a
causal model the two are the same residuals, so they agree to float32 rounding; the tests hold them to it.
"""

from dataclasses import dataclass, fields

import torch

from lens_plugins.core.errors import LensTypeError, LensValueError
from lens_plugins.core.trace.generation import FORMAT
from lens_plugins.methods.lens import LensRequest, assemble
from lens_plugins.methods.result import LensResult
from lens_plugins.typecheck import typechecked


@typechecked
@dataclass(repr=False)  # keep LensResult's short repr
class GeneratedLens(LensResult):
    """A ``LensResult`` over generated positions; ``token_ids`` is prompt + continuation and
    ``prompt_length`` where the continuation starts."""

    prompt_length: int = 0

    def generated_ids(self, batch: int = 0) -> list[int]:
        return self.token_ids[batch, self.prompt_length:].tolist()

    def generated_tokens(self, batch: int = 0) -> list[str]:
        """The continuation, token by token: one per decoded column."""
        return [self.token(i) for i in self.generated_ids(batch)]

    def column_labels(self, batch: int = 0) -> list[str]:
        """Each decoded position's generated token with its index in the sequence (the plot's x axis)."""
        from lens_plugins.tokens import display_token

        return [f"{display_token(self.token(self.token_ids[batch, p + 1]))} [{p + 1}]" for p in self.positions]

    def plot(self, metric: str = "prob", batch: int = 0):
        """The heatmap of ``LensResult.plot`` with one column per generated token."""
        fig = super().plot(metric, batch)
        fig.update_traces(x=self.column_labels(batch))
        fig.update_xaxes(title_text="generated token [position]")
        return fig


def refuse_arguments(kwargs: dict, lens_parameters) -> None:
    """Refuse, the same way on both backends and before anything runs, what the extra keyword arguments of the
    one-call generation lens (``model.generate``'s on nnsight, ``logit_lens``'s on TransformerLens) would
    otherwise take in another sense or refuse late: ``positions=`` (the generation lens decodes the generated
    positions) and a lens argument in the wrong case (``top_K=``: transformers refused it as an unused model
    kwarg once the trace had begun, TransformerLens with a ``TypeError`` after generating)."""
    if "positions" in kwargs:
        raise LensValueError("the generation lens decodes the generated positions; it takes no positions=")
    for key in kwargs:
        meant = [name for name in lens_parameters if name.lower() == key.lower() and name != key]
        if meant:
            raise LensValueError(f"the generation lens has no argument {key}=; did you mean {meant[0]}=?")


def generated_positions(prompt_length: int, n_generated: int) -> list[int]:
    """The positions whose predictions are the generated tokens."""
    if prompt_length < 1:
        raise LensValueError("the prompt is empty: there is nothing to generate from")
    if n_generated < 1:
        raise LensValueError("nothing was generated (max_new_tokens < 1, or the model stopped at once)")
    return list(range(prompt_length - 1, prompt_length + n_generated - 1))


def from_lens_result(result: LensResult, prompt_length: int) -> GeneratedLens:
    """Relabel a teacher-forced ``LensResult`` of prompt + continuation as a ``GeneratedLens``."""
    return GeneratedLens(**{f.name: getattr(result, f.name) for f in fields(LensResult)}, prompt_length=prompt_length)


def from_saved_steps(saved: dict, tokenizer) -> GeneratedLens:
    """The ``GeneratedLens`` of what ``core.generation.generation_lens`` saved, one entry per step."""
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise LensTypeError(f"expected what generation_lens(model, tracer, steps) returned inside model.generate(...), "
                        f"got {type(saved).__name__}")
    steps = saved["steps"]
    if not steps:
        raise LensValueError("the generation lens holds no step: did the trace run (a failed remote job leaves "
                         "nothing), and was max_new_tokens at least 1?")
    sequence = saved["sequence"].long()
    prompt_length = saved["prompt_ids"].shape[1]
    stats = {name: torch.cat([s[name] for s in steps], dim=0 if name == "final_top1" else 1) for name in steps[0]}
    request = LensRequest.from_dict(dict(saved["request"], positions=generated_positions(prompt_length, len(steps))))
    result = assemble(stats, request, saved["labels"], sequence, tokenizer)
    return from_lens_result(result, prompt_length)

__all__ = ["GeneratedLens", "refuse_arguments", "generated_positions", "from_lens_result", "from_saved_steps"]
