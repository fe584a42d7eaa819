"""Cross-model Patchscopes (Ghandeharioun et al., ICML 2024, section 5): one model reads another's hidden
states through an affine map fitted on paired hidden states.

``fit_mapping(source, target)`` reads both models' residual rows over a corpus (the built-in one by default),
pairs positions where both tokenizations end a token at the same character offset (``core.cross_model``:
with one tokenizer, every position), and solves ``h_target ~ W h_source + b`` by least squares (``ridge=``
for a ridge penalty) for every (source row, target row). The ``CrossModelMap`` holds the maps, the
held-out R^2 of each and how many pairs were kept; it saves and loads as tensors only (``files``).
``map.mappings(target_row)`` is the ``mapping=`` of a Patchscope with ``target_model=`` and
``target_layer=target_row``. ``cross_model_scores`` runs that Patchscope for every target row over held-out
prompts and reports its precision@1 against the target model's own next-token prediction, beside the R^2:
the paper's source-layer x target-layer heatmap (``CrossModelScores.plot``).

The fit reads each model with plain forward hooks (``backends.hf.residual_stack``), so it runs where the
models are loaded; the Patchscope runs on either backend, and on nnsight each model's trace may be remote.
"""

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

from lens_plugins.core import cross_model as arithmetic
from lens_plugins.core import rows as row_plan
from lens_plugins.core.errors import LensTypeError, LensValueError
from lens_plugins.core.rows import Row
from lens_plugins.methods.patchscope import IDENTITY_PROMPT, RowSpec
from lens_plugins.typecheck import typechecked

FORMAT = "lens_plugins.cross_model_map/1"
WINDOW_CHARS = 400
"""Characters per text window of the fit: well inside any context, short enough to batch nothing."""


def tokenizer_of(model):
    """The Hugging Face tokenizer a Patchscope tokenizes ``model``'s prompts with (on TransformerLens the
    model's own files' tokenizer, ``reader.hf_tokenizer``)."""
    from lens_plugins import backends

    if backends.kind(model) == "transformer_lens":
        from lens_plugins.backends.transformer_lens.reader import hf_tokenizer

        return hf_tokenizer(model)
    return model.tokenizer


def token_ends(tokenizer, text: str, prepend_bos: Optional[bool] = None) -> tuple[list[int], list[int]]:
    """``(ids, ends)``: the ids every Patchscope runs for ``text`` (``backends._common.prompt_ids``) and each
    token's end offset in ``text`` (``-1`` for a special token such as an added BOS), from the tokenizer's
    offsets mapping (a fast tokenizer's)."""
    from lens_plugins.backends._common import prompt_ids

    ids = prompt_ids(tokenizer, text, prepend_bos)
    try:
        encoded = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    except NotImplementedError:
        raise LensValueError(f"{type(tokenizer).__name__} gives no character offsets, which pairing two tokenizations "
                             "needs: load the model's fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))"
                             ) from None
    plain = list(encoded["input_ids"])
    ends = [-1 if special else int(end) for (_, end), special in
            zip(encoded["offset_mapping"], encoded["special_tokens_mask"])]
    if ids == plain:
        return ids, ends
    if ids[1:] == plain:  # a BOS prepended (prepend_bos=True)
        return ids, [-1] + ends
    return ids, ends[len(plain) - len(ids):]  # the tokenizer's BOS removed (prepend_bos=False)


@dataclass(frozen=True)
class TextPairs:
    """One text under two tokenizers: the ids each model runs and the positions paired (same end offset)."""

    source_ids: list[int]
    target_ids: list[int]
    source_index: Tensor  # [pairs] long: positions in source_ids
    target_index: Tensor  # [pairs] long: the paired positions in target_ids

    def source_positions(self, target_positions: Sequence[int]) -> list[int]:
        """The source positions paired with ``target_positions``, refusing one that has no partner."""
        partner = dict(zip(self.target_index.tolist(), self.source_index.tolist()))
        unpaired = [p for p in target_positions if p not in partner]
        if unpaired:
            raise LensValueError(f"target positions {unpaired} end no source token at the same character: the two "
                                 f"tokenizations pair only positions {sorted(partner)}; pass positions= among those")
        return [partner[p] for p in target_positions]


def text_pairs(source_tokenizer, target_tokenizer, text: str, prepend_bos: Optional[bool] = None) -> TextPairs:
    """``text`` tokenized by both models, and its paired positions (``core.cross_model.aligned_pairs``)."""
    source_ids, source_ends = token_ends(source_tokenizer, text, prepend_bos)
    if target_tokenizer is source_tokenizer:
        index = torch.arange(len(source_ids))
        return TextPairs(source_ids, source_ids, index, index)
    target_ids, target_ends = token_ends(target_tokenizer, text, prepend_bos)
    source_index, target_index = arithmetic.aligned_pairs(source_ends, target_ends)
    if source_ids == target_ids and source_ends == target_ends:  # one tokenization: a BOS pairs with itself too
        source_index = target_index = torch.arange(len(source_ids))
    return TextPairs(source_ids, target_ids, source_index, target_index)


def check_same_backend(model, target_model) -> None:
    """Both models run on one backend family (a Patchscope's source read and target run share the verb)."""
    from lens_plugins import backends

    if backends.kind(model) != backends.kind(target_model):
        raise LensTypeError(f"target_model runs on {backends.kind(target_model)} and the source model on "
                            f"{backends.kind(model)}: wrap both for one backend")


@typechecked
@dataclass
class CrossModelMap:
    """Affine maps ``h_target ~ weight[s, t] @ h_source + bias[s, t]`` from each source row ``s`` to each
    target row ``t``, fitted by least squares on ``pairs_kept - heldout_pairs`` paired positions, with the
    held-out R^2 of each (``1 - SSE / SST`` summed over dimensions) on ``heldout_pairs`` others. ``tokens`` is
    the source tokens read: with different tokenizers ``pairs_kept`` is smaller."""

    source_labels: list[str]
    target_labels: list[str]
    weight: Float[Tensor, "source target d_target d_source"]
    bias: Float[Tensor, "source target d_target"]
    r2: Float[Tensor, "source target"]
    pairs_kept: int
    heldout_pairs: int
    tokens: int
    ridge: float

    def _index(self, labels: list[str], row: RowSpec, what: str) -> int:
        if isinstance(row, int) and -len(labels) <= row < len(labels):
            return row % len(labels)
        if isinstance(row, str) and row in labels:
            return labels.index(row)
        raise LensValueError(f"{what} row {row!r} was not fitted: this map's {what} rows are {labels}")

    def mapping(self, source_row: RowSpec, target_row: RowSpec) -> tuple[Tensor, Tensor]:
        """``(weight [d_target, d_source], bias [d_target])`` from one source row to one target row: a
        Patchscope's ``mapping=``."""
        s = self._index(self.source_labels, source_row, "source")
        t = self._index(self.target_labels, target_row, "target")
        return self.weight[s, t], self.bias[s, t]

    def mappings(self, target_row: RowSpec) -> dict:
        """``{source label: (weight, bias)}`` into ``target_row``: the ``mapping=`` of a Patchscope over every
        fitted source row with ``target_layer=target_row``."""
        return {label: self.mapping(label, target_row) for label in self.source_labels}

    def to_dataframe(self):
        """One line per (source row, target row): its held-out R^2."""
        import pandas as pd

        return pd.DataFrame.from_records([
            {"source_row": s, "target_row": t, "r2": float(self.r2[i, j])}
            for i, s in enumerate(self.source_labels) for j, t in enumerate(self.target_labels)])

    def save(self, path, *, overwrite: bool = False) -> None:
        """Write the map to one ``.pt`` file of tensors and plain values (``files.atomic_write``)."""
        from lens_plugins.files import atomic_write, check_file

        target = check_file(path, overwrite=overwrite)
        with atomic_write(target) as staging:
            torch.save({"format": FORMAT, **{name: getattr(self, name) for name in self.__dataclass_fields__}},
                       staging)

    @classmethod
    def load(cls, path) -> "CrossModelMap":
        """Read a map written by ``save`` (``torch.load(weights_only=True)``: nothing in the file runs)."""
        from lens_plugins.files import load_tensors

        state = load_tensors(path, "save the map with CrossModelMap.save")
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise LensValueError(f"{path} is not a cross-model map ({FORMAT}): write one with CrossModelMap.save")
        return cls(**{name: state[name] for name in cls.__dataclass_fields__})


def _windows(texts: list[str], chars: int) -> list[str]:
    """The documents cut into windows of at most ``chars`` characters, each ending at a space where one is."""
    out = []
    for text in texts:
        start = 0
        while start < len(text):
            end = min(len(text), start + chars)
            space = text.rfind(" ", start + chars // 2, end) if end < len(text) else -1
            end = space if space > start else end
            piece = text[start:end].strip()
            if piece:
                out.append(piece)
            start = end
    return out


def residual_rows(model) -> list:
    """``model``'s residual rows ("embed", "1_pre", ..., "<L-1>_post"), on either backend."""
    from lens_plugins import backends
    from lens_plugins.backends.hf import hf_model, stack_rows
    from lens_plugins.core import architectures, verification

    if backends.kind(model) == "transformer_lens":
        return stack_rows(model.cfg.n_layers)
    hf = hf_model(model)
    return stack_rows(len(architectures.get_path(hf, verification.resolve(hf)["layers"])))


def read_rows(model, ids: list[int], labels: list[str]) -> Tensor:
    """``[rows, seq, d]`` float32 CPU: ``model``'s residual rows ``labels`` on one sequence ``ids``, read with
    TransformerLens hooks (a bridge's module tree is its own) or forward hooks on the Hugging Face model
    inside an nnsight model (``backends.hf.residual_stack``). No logits are kept."""
    from lens_plugins import backends
    from lens_plugins.backends.hf import hf_model, residual_stack, stack_rows

    if backends.kind(model) == "transformer_lens":
        from lens_plugins.backends.transformer_lens.reader import hook_name

        names = [hook_name(Row.parse(label)) for label in labels]
        _, cache = model.run_with_cache(torch.tensor([ids], device=model.cfg.device), names_filter=names)
        return torch.stack([cache[name][0] for name in names]).float().cpu()
    hf = hf_model(model)
    stack = residual_stack(hf, torch.tensor([ids], device=next(hf.parameters()).device))
    every = [row.label for row in stack_rows(stack.shape[0] - 1)]
    return stack[[every.index(label) for label in labels], 0].float().cpu()


def _rows(model, layers) -> list[str]:
    """The fitted rows of ``model``: ``core.rows.select`` of its residual rows (the last always kept)."""
    return [row.label for row in row_plan.select(residual_rows(model), layers)]


def _states(model, ids: list[int], labels: list[str], positions: Tensor) -> Tensor:
    """``[rows, positions, d]`` float32: ``model``'s residual rows ``labels`` on ``ids`` at ``positions``."""
    return read_rows(model, ids, labels)[:, positions]


@typechecked
def fit_mapping(
    source_model,
    target_model=None,
    texts=None,
    *,
    source_layers: Optional[Sequence[RowSpec]] = None,
    target_layers: Optional[Sequence[RowSpec]] = None,
    ridge: float = 0.0,
    max_pairs: int = 4096,
    heldout: float = 0.2,
    window_chars: int = WINDOW_CHARS,
    prepend_bos: Optional[bool] = None,
    skip_first: bool = True,
) -> CrossModelMap:
    """Fit affine maps from ``source_model``'s rows to ``target_model``'s (default: the source itself, across
    rows) on paired hidden states of ``texts``: ``None`` (the built-in corpus), a list of strings or a file as
    for training, or token blocks ``[blocks, seq]`` when both models share a tokenizer.

    The text is cut into windows of ``window_chars`` characters, each tokenized as a Patchscope prompt
    (``prepend_bos``), run through both models, and paired at the positions where both tokenizations end a
    token at the same character (all of them with one tokenizer); windows are read until ``max_pairs``
    pairs. The last ``heldout`` share of windows is held out for the R^2. ``source_layers`` /
    ``target_layers`` pick rows by index or label (default all; the last is always kept): the map holds
    ``rows_s * rows_t`` matrices of ``d_target x d_source``, so pick a few on a large model.
    ``skip_first`` leaves out each window's first position in either tokenization: the attention sink, whose
    state can be a hundred times larger than the others' (SmolLM2: norm ~20000 against ~220 at row 20_pre,
    98% of the rows' variance), so that it would decide both the fit and the R^2 alone."""
    from lens_plugins.backends._common import eval_mode
    from lens_plugins.training.loop import load_texts

    target_model = source_model if target_model is None else target_model
    check_same_backend(source_model, target_model)
    if not 0 < heldout < 1:
        raise LensValueError(f"heldout must be a share strictly between 0 and 1, got {heldout}")
    if max_pairs < 2:
        raise LensValueError(f"max_pairs must be at least 2, got {max_pairs}")
    source_labels = _rows(source_model, source_layers)
    target_labels = _rows(target_model, target_layers)
    same = target_model is source_model
    source_tokenizer = tokenizer_of(source_model)
    target_tokenizer = source_tokenizer if same else tokenizer_of(target_model)
    if isinstance(texts, Tensor):
        if texts.dim() != 2 or texts.is_floating_point():
            raise LensValueError(f"token blocks must be an integer tensor [blocks, seq], got {texts.dtype} "
                                 f"{tuple(texts.shape)}")
        index = torch.arange(texts.shape[1])
        windows = [TextPairs(block.tolist(), block.tolist(), index, index) for block in texts]
    else:
        windows = (text_pairs(source_tokenizer, target_tokenizer, window, prepend_bos)
                   for window in _windows(load_texts(texts), window_chars))
    xs, ys, tokens, kept = [], [], 0, 0
    with ExitStack() as stack, torch.no_grad():
        for model in {id(source_model): source_model, id(target_model): target_model}.values():
            stack.enter_context(eval_mode(model))
        for pairs in windows:
            tokens += len(pairs.source_ids)
            if skip_first:
                keep = (pairs.source_index > 0) & (pairs.target_index > 0)
                pairs = TextPairs(pairs.source_ids, pairs.target_ids, pairs.source_index[keep],
                                  pairs.target_index[keep])
            if len(pairs.source_index) == 0:
                continue
            if same:
                both = _states(source_model, pairs.source_ids, source_labels + target_labels, pairs.source_index)
                x, y = both[:len(source_labels)], both[len(source_labels):]
            else:
                x = _states(source_model, pairs.source_ids, source_labels, pairs.source_index)
                y = _states(target_model, pairs.target_ids, target_labels, pairs.target_index)
            xs.append(x)
            ys.append(y)
            kept += x.shape[1]
            if kept >= max_pairs:
                break
    n_held = max(1, round(heldout * len(xs)))
    if len(xs) - n_held < 1:
        raise LensValueError(f"{len(xs)} text window(s) gave paired positions: the fit and the held-out R^2 need at "
                             "least two; give more text (or a larger max_pairs)")
    x_fit, y_fit = torch.cat(xs[:-n_held], 1), torch.cat(ys[:-n_held], 1)
    x_held, y_held = torch.cat(xs[-n_held:], 1), torch.cat(ys[-n_held:], 1)
    weights, biases = [], []
    r2 = torch.zeros(len(source_labels), len(target_labels))
    for s in range(len(source_labels)):  # every target row at once: one solve per source row
        weight, bias = arithmetic.affine_solve(x_fit[s], y_fit.transpose(0, 1), ridge)
        weights.append(weight)
        biases.append(bias)
        for t in range(len(target_labels)):
            r2[s, t] = arithmetic.r_squared(x_held[s], y_held[t], weight[t], bias[t])
    return CrossModelMap(source_labels=source_labels, target_labels=target_labels, weight=torch.stack(weights),
                         bias=torch.stack(biases), r2=r2, pairs_kept=kept, heldout_pairs=int(x_held.shape[1]),
                         tokens=tokens, ridge=float(ridge))


@typechecked
@dataclass
class CrossModelScores:
    """Per (source row, target row): the Patchscope's ``precision_at_1`` (its top-1 at the target is the
    target model's own next-token top-1 on the source text) over ``positions`` paired positions of held-out
    prompts, and the map's held-out ``r2``."""

    source_labels: list[str]
    target_labels: list[str]
    precision_at_1: Float[Tensor, "source target"]
    r2: Float[Tensor, "source target"]
    positions: int
    pairs_kept: int
    tokens: int

    def to_dataframe(self):
        """One line per (source row, target row)."""
        import pandas as pd

        return pd.DataFrame.from_records([
            {"source_row": s, "target_row": t, "precision_at_1": float(self.precision_at_1[i, j]),
             "r2": float(self.r2[i, j])}
            for i, s in enumerate(self.source_labels) for j, t in enumerate(self.target_labels)])

    def plot(self):
        """The two heatmaps, source row (y) by target row (x): precision@1 and R^2 (``plot.cross_model``)."""
        from lens_plugins.plot.cross_model import cross_model_figure

        return cross_model_figure(self)


def heldout_prompts(n: int = 8, chars: int = 200) -> list[str]:
    """``n`` windows from the end of the built-in corpus (the fit reads it from the start, until its
    ``max_pairs``), for scoring a map on text it was not fitted on."""
    from lens_plugins.training.loop import builtin_corpus

    return _windows(builtin_corpus()[::-1], chars)[:n]


@typechecked
def cross_model_scores(
    source_model,
    target_model,
    fitted: CrossModelMap,
    prompts: Optional[Union[str, Sequence[str]]] = None,
    *,
    target_prompt: str = IDENTITY_PROMPT,
    batch_size: int = 64,
    **kwargs,
) -> CrossModelScores:
    """Run the cross-model Patchscope of every fitted source row into every fitted target row over
    ``prompts`` (default ``heldout_prompts()``), at every paired position, writing into ``target_prompt``'s
    last token; score its top-1 against ``target_model``'s own next-token prediction at that position.
    One Patchscope per (prompt, target row); ``kwargs`` go to it (``remote``, ``prepend_bos``, ...)."""
    from lens_plugins.methods.patchscope import patchscope

    prompts = heldout_prompts() if prompts is None else [prompts] if isinstance(prompts, str) else list(prompts)
    hits = torch.zeros(len(fitted.source_labels), len(fitted.target_labels))
    positions = 0
    for prompt in prompts:
        for t, target_row in enumerate(fitted.target_labels):
            result = patchscope(source_model, prompt, target_model=target_model, layers=fitted.source_labels,
                                target_layer=target_row, mapping=fitted.mappings(target_row),
                                target_prompt=target_prompt, top_k=1, reductions=("top_k", "final_top1"), batch_size=batch_size,
                                **kwargs)
            if result.labels != fitted.source_labels:
                raise LensValueError(f"the source model's rows {result.labels} are not the map's {fitted.source_labels}: "
                                     "was it fitted on another model?")
            hits[:, t] += result.top1_agreement()[:, 0].sum(-1).float()
        positions += len(result.positions)
    return CrossModelScores(source_labels=list(fitted.source_labels), target_labels=list(fitted.target_labels),
                            precision_at_1=hits / max(positions, 1), r2=fitted.r2.clone(), positions=positions,
                            pairs_kept=fitted.pairs_kept, tokens=fitted.tokens)

__all__ = ["FORMAT", "WINDOW_CHARS", "tokenizer_of", "residual_rows", "read_rows", "token_ends", "TextPairs", "text_pairs", "check_same_backend",
           "CrossModelMap", "fit_mapping", "CrossModelScores", "heldout_prompts", "cross_model_scores"]
