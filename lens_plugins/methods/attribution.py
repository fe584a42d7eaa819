"""Direct logit attribution (DLA) and logit differences: which embedding, head or MLP moved the prediction.

``Attribution`` holds the finest split a backend produced (embeddings, every head, every attention output
bias, every MLP) at one position, and shows it ``by`` component, layer or head; the arithmetic is
``lens_plugins.core.dla`` (torch-only, so that an nnsight trace runs it on the server).

What is attributed: the final norm's scale is frozen at its value on the real forward pass, so the
pre-soft-cap logit is linear in the residual stream; each write's attribution is its dot product with
``norm weight * scale * W_U[:, target]`` (centred for a LayerNorm), and the final-norm bias and ``b_U`` form
``constant``. ``values.sum(-1) + constant == explained`` is exact up to float rounding, and ``error``
reports how far it is. With a distractor the same holds for the target-minus-distractor logit difference.
A token set (several spellings of one answer) attributes the probability-weighted mean of its members'
logits, weights frozen at the real pass: linear, hence exact, and at that point the direction of the
set's log-probability (the log-sum-exp).
"""

import dataclasses
from collections.abc import Sequence
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins.core import dla, pipeline
from lens_plugins.core.errors import LensKeyError, LensTypeError, LensValueError
from lens_plugins.core.request import token_set_ids
from lens_plugins.core.trace.attribution import ATTRIBUTION_FORMAT
from lens_plugins.core.trace.lens import DIFF_FORMAT
from lens_plugins.decoder import Decoder
from lens_plugins.typecheck import typechecked

TokenSet = Union[str, int, Sequence[Union[str, int]]]


@typechecked
def token_set(tokenizer, spec: TokenSet, d_vocab: int, argument: str = "target") -> tuple[list[int], list[str]]:
    """Ids and display names of a target (or distractor: ``argument``): one token (string or id) or a list of
    them (a token set). The ids are checked before any is decoded for its name."""
    ids = token_set_ids(tokenizer, spec, d_vocab, argument)
    members = [spec] if isinstance(spec, (str, int)) else list(spec)
    return ids, [m if isinstance(m, str) else tokenizer.decode([i]) for m, i in zip(members, ids)]


@typechecked
@dataclasses.dataclass
class Attribution:
    """Direct logit attribution at one position of each prompt of a batch.

    Fields are the finest split; ``labels`` / ``values`` show it ``by`` component (embeddings, each
    attention layer, each MLP), layer (attention + MLP) or head (each head, each layer's attention output
    bias, each MLP). ``explained`` is the (weighted) target-minus-distractor logit before any soft-cap,
    read from the real final residual; ``model_value`` is the same with the model's soft-capped logits.
    """

    by: str
    position: int
    target_names: list[str]
    distractor_names: list[str]
    member_ids: Int[Tensor, "member"]  # target members, then distractor members
    member_weights: Float[Tensor, "batch member"]  # each member's share of its set's probability
    embed: Float[Tensor, "batch"]
    pos_embed: Optional[Float[Tensor, "batch"]]
    heads: Float[Tensor, "batch layer head"]
    head_bias: Float[Tensor, "batch layer"]
    attn: Float[Tensor, "batch layer"]
    mlp: Float[Tensor, "batch layer"]
    constant: Float[Tensor, "batch"]
    explained: Float[Tensor, "batch"]
    model_value: Float[Tensor, "batch"]
    reconstruction_error: Float[Tensor, "batch"]
    parallel: bool = False
    # by="neuron": every MLP's neurons in all, its output bias's share, and the top neurons (one list per batch)
    neuron_sums: Optional[Float[Tensor, "batch layer"]] = None
    mlp_bias: Optional[Float[Tensor, "batch layer"]] = None
    neuron_values: Optional[Float[Tensor, "batch neuron"]] = None
    neuron_layers: Optional[Int[Tensor, "neuron"]] = None
    neuron_index: Optional[Int[Tensor, "neuron"]] = None
    # effects=k: the k tokens each write (``effect_labels``) promotes and suppresses most, pre-soft-cap logits
    effect_labels: Optional[list[str]] = None
    promoted_ids: Optional[Int[Tensor, "batch effect k"]] = None
    promoted_logits: Optional[Float[Tensor, "batch effect k"]] = None
    suppressed_ids: Optional[Int[Tensor, "batch effect k"]] = None
    suppressed_logits: Optional[Float[Tensor, "batch effect k"]] = None
    vocab_strings: Optional[dict[int, str]] = None

    def __post_init__(self) -> None:
        check_view(self.by)
        if self.by == "neuron" and self.neuron_values is None:
            raise LensValueError("by='neuron' needs the neuron split, computed when attributing: pass by='neuron' "
                                 "to attribution(...) / run_attribution(...)")

    def view(self, by: str) -> "Attribution":
        """The same attribution shown another way (``"component"``, ``"layer"``, ``"head"``, or ``"neuron"``
        when it was computed with ``by="neuron"``)."""
        return dataclasses.replace(self, by=by)

    def neuron_labels(self) -> list[str]:
        """``"L{layer}N{index}"`` of the top neurons, largest summed magnitude first."""
        return [f"L{layer}N{i}" for layer, i in zip(self._require_neurons()[0].tolist(), self.neuron_index.tolist())]

    def _require_neurons(self) -> tuple[Tensor, Tensor]:
        if self.neuron_values is None:
            raise LensValueError("no neuron split: attribute with by='neuron'")
        return self.neuron_layers, self.neuron_values

    def top_neurons(self, n: int = 10, batch: int = 0) -> list[tuple[str, float]]:
        """The ``n`` top neurons of the batch with their attribution in prompt ``batch``, largest magnitude first."""
        _, values = self._require_neurons()
        row = values[batch]
        order = row.abs().argsort(descending=True)[:n].tolist()
        labels = self.neuron_labels()
        return [(labels[i], float(row[i])) for i in order]

    def tokens(self, component: str, batch: int = 0) -> dict[str, list[tuple[str, float]]]:
        """The tokens ``component``'s write promotes and suppresses most (``effects=k``): its write through the
        final norm frozen at its real scale and the unembedding, as ``(token, logit)`` pairs, pre-soft-cap,
        without ``b_U`` (a write's own effect). ``component`` is any label of the ``"head"`` view, an
        ``"{layer}_attn"``, or a top neuron ``"L{layer}N{index}"``."""
        if self.effect_labels is None:
            raise LensValueError("no promoted / suppressed tokens: attribute with effects=k (e.g. effects=10)")
        labels = list(self.effect_labels)
        if self.neuron_values is not None:
            names = self.neuron_labels()
            labels = [names[int(label.split()[1])] if label.startswith("neuron ") else label for label in labels]
        if component not in labels:
            raise LensKeyError(f"no write {component!r} with promoted / suppressed tokens; choose from {labels}")
        c = labels.index(component)

        def named(ids: Tensor, logits: Tensor) -> list[tuple[str, float]]:
            strings = self.vocab_strings or {}
            return [(strings.get(i, f"<{i}>"), float(v)) for i, v in zip(ids[batch, c].tolist(), logits[batch, c])]

        return {"promoted": named(self.promoted_ids, self.promoted_logits),
                "suppressed": named(self.suppressed_ids, self.suppressed_logits)}

    @property
    def n_layers(self) -> int:
        return self.attn.shape[1]

    def _embeddings(self) -> list[tuple[str, Tensor]]:
        rows = [("embed", self.embed)]
        return rows + ([("pos_embed", self.pos_embed)] if self.pos_embed is not None else [])

    def _rows(self) -> list[tuple[str, Tensor]]:
        rows = self._embeddings()
        for layer in range(self.n_layers):
            if self.by == "layer":
                rows.append((f"layer {layer}", self.attn[:, layer] + self.mlp[:, layer]))
                continue
            if self.by == "head":
                rows += [(f"L{layer}H{h}", self.heads[:, layer, h]) for h in range(self.heads.shape[2])]
                rows.append((f"{layer}_attn_bias", self.head_bias[:, layer]))
            else:
                rows.append((f"{layer}_attn", self.attn[:, layer]))
            if self.by == "neuron":
                rows += self._neuron_rows(layer)
            else:
                rows.append((f"{layer}_mlp", self.mlp[:, layer]))
        return rows

    def _neuron_rows(self, layer: int) -> list[tuple[str, Tensor]]:
        """A layer's top neurons, then the rest of its MLP (its other neurons and its output bias), so that the
        rows still add up to ``explained``."""
        in_layer = (self.neuron_layers == layer).nonzero().reshape(-1).tolist()
        labels = self.neuron_labels()
        rows = [(labels[j], self.neuron_values[:, j]) for j in in_layer]
        shown = self.neuron_values[:, in_layer].sum(-1)
        return rows + [(f"{layer}_mlp_rest", self.mlp[:, layer] - shown)]

    @property
    def labels(self) -> list[str]:
        return [label for label, _ in self._rows()]

    @property
    def values(self) -> Float[Tensor, "batch component"]:
        return torch.stack([value for _, value in self._rows()], dim=-1)

    @property
    def error(self) -> Float[Tensor, "batch"]:
        """``|sum of attributions + constant - explained|``: the attribution's own exactness check."""
        return (self.values.sum(-1) + self.constant - self.explained).abs()

    def report(self) -> str:
        """One line per prompt: what is explained, and how exactly the attributions add up to it."""
        what = " - ".join(filter(None, [_set_name(self.target_names), _set_name(self.distractor_names)]))
        lines = []
        for b in range(self.explained.shape[0]):
            lines.append(
                f"[{b}] {what} at position {self.position}: explained {self.explained[b]:.6g} = "
                f"sum of {len(self.labels)} attributions {self.values[b].sum():.6g} + constant "
                f"{self.constant[b]:.6g} (error {self.error[b]:.2g}; stream reconstruction error "
                f"{self.reconstruction_error[b]:.2g})"
            )
        return "\n".join(lines)

    def top(self, n: int = 10, batch: int = 0, largest: Optional[bool] = True) -> list[tuple[str, float]]:
        """The ``n`` most positive attributions of one prompt, signed (``largest=False``: the most negative;
        ``largest=None``: the largest by magnitude, either sign, which is what the waterfall
        ``plot.attribution_bars`` shows). Ties keep the labels' order."""
        values = self.values[batch]
        keys = values.abs() if largest is None else values
        order = keys.argsort(descending=largest is not False, stable=True)[:n]
        labels = self.labels
        return [(labels[i], float(values[i])) for i in order.tolist()]

    def head_grid(self, batch: int = 0) -> Float[Tensor, "layer head"]:
        return self.heads[batch]

    def plot(self, batch: int = 0):
        """A plotly figure: a layer x head heatmap ``by="head"``, else a bar per component or layer."""
        from lens_plugins.plot.attribution import attribution_figure

        return attribution_figure(self, batch)


VIEWS = ("component", "layer", "head", "neuron")


def check_view(by: str) -> str:
    """``by`` as one of ``VIEWS``, or refused (the same words on both backends)."""
    if by not in VIEWS:
        raise LensValueError(f"by={by!r}: choose 'component', 'layer', 'head' or 'neuron'")
    return by


def _set_name(names: list[str]) -> str:
    if not names:
        return ""
    return repr(names[0]) if len(names) == 1 else "{" + ", ".join(map(repr, names)) + "}"


@typechecked
def from_values(
    values: dict[str, Tensor],
    *,
    by: str,
    position: int,
    target_names: list[str],
    distractor_names: list[str],
    parallel: bool,
    tokenizer=None,
) -> Attribution:
    """An ``Attribution`` from what ``core.dla.attribute`` returned (locally or from a trace); ``tokenizer``
    names the promoted and suppressed tokens, when there are any."""
    optional = {name: values[name].cpu() for name in _OPTIONAL if name in values}
    if "promoted_ids" in values:
        n_heads = values["heads"].shape[2]
        n_neurons = values["neuron_index"].shape[0] if "neuron_index" in values else 0
        optional["effect_labels"] = dla.effect_labels(values["attn"].shape[1], n_heads, values.get("pos_embed") is not None,
                                                      n_neurons)
        shown = torch.cat([values["promoted_ids"].reshape(-1), values["suppressed_ids"].reshape(-1)]).unique().tolist()
        optional["vocab_strings"] = {i: tokenizer.decode([i]) for i in shown} if tokenizer is not None else None
    return Attribution(
        by=by, position=position, target_names=target_names, distractor_names=distractor_names,
        member_ids=values["ids"].cpu(), member_weights=values["coef"].abs().cpu(),
        embed=values["embed"].cpu(), pos_embed=None if values.get("pos_embed") is None else values["pos_embed"].cpu(),
        heads=values["heads"].cpu(), head_bias=values["head_bias"].cpu(), attn=values["attn"].cpu(),
        mlp=values["mlp"].cpu(), constant=values["constant"].cpu(), explained=values["explained"].cpu(),
        model_value=values["model_value"].cpu(), reconstruction_error=values["reconstruction_error"].cpu(),
        parallel=parallel, **optional,
    )


_OPTIONAL = ("neuron_sums", "mlp_bias", "neuron_values", "neuron_layers", "neuron_index", "promoted_ids",
             "promoted_logits", "suppressed_ids", "suppressed_logits")


@typechecked
def result_from_saved(saved: dict, tokenizer, by: str = "component") -> Attribution:
    """The ``Attribution`` of what ``core.trace.attribution`` saved inside an nnsight trace."""
    if not isinstance(saved, dict) or saved.get("format") != ATTRIBUTION_FORMAT:
        raise LensTypeError(
            f"expected what attribution(model, ...) returned inside a trace, got {type(saved).__name__}; "
            "did the trace run (a remote job that failed leaves nothing)?"
        )
    return from_values(
        saved["values"], by=by, position=saved["position"],
        target_names=[tokenizer.decode([i]) for i in saved["target_ids"]],
        distractor_names=[tokenizer.decode([i]) for i in saved["distractor_ids"]], parallel=saved["parallel"],
        tokenizer=tokenizer,
    )


@typechecked
@dataclasses.dataclass
class LogitDiff:
    """Target-minus-distractor logit through the lens, at every row (a point in the residual stream) and
    decoded position. For token sets each side is the log-sum-exp of its members' logits, so the
    difference is ``log P(target set) - log P(distractor set)`` under each row's lens distribution."""

    labels: list[str]
    positions: list[int]
    values: Float[Tensor, "row batch pos"]
    target_names: list[str]
    distractor_names: list[str]

    def row(self, label: str) -> Float[Tensor, "batch pos"]:
        if label not in self.labels:
            raise LensKeyError(f"no row {label!r}; rows are {self.labels}")
        return self.values[self.labels.index(label)]

    def plot(self, batch: int = 0):
        from lens_plugins.plot.attribution import logit_diff_figure

        return logit_diff_figure(self, batch)


@typechecked
def logit_diff_from_saved(saved: dict, tokenizer) -> LogitDiff:
    """The ``LogitDiff`` of what ``core.trace.logit_diff`` saved inside an nnsight trace."""
    if not isinstance(saved, dict) or saved.get("format") != DIFF_FORMAT:
        raise LensTypeError(
            f"expected what logit_diff(model, ...) returned inside a trace, got {type(saved).__name__}; "
            "did the trace run (a remote job that failed leaves nothing)?"
        )
    return LogitDiff(list(saved["labels"]), list(saved["positions"]), saved["values"].float(),
                     [tokenizer.decode([i]) for i in saved["target_ids"]],
                     [tokenizer.decode([i]) for i in saved["distractor_ids"]])


@typechecked
def attribute_parts(
    parts: dict[str, Optional[Tensor]],
    decoder: Decoder,
    target_ids: list[int],
    distractor_ids: list[int],
    neurons: Optional[list] = None,
    top_neurons: int = 0,
    effects: int = 0,
) -> dict[str, Tensor]:
    """``core.dla.attribute`` with a ``Decoder`` (the local side's form of the decoder), refused non-finite
    as inside a trace (``pipeline.check_decoder``)."""
    pipeline.check_decoder(decoder)
    with torch.no_grad():
        return dla.attribute(parts, decoder, target_ids, distractor_ids, neurons, top_neurons, effects)

__all__ = ["TokenSet", "token_set", "VIEWS", "check_view", "Attribution", "from_values", "result_from_saved", "LogitDiff",
    "logit_diff_from_saved", "attribute_parts"]
