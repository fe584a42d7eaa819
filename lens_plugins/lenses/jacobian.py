"""The Jacobian lens (Gurnee et al., "Verbalizable Representations Form a Global Workspace in Language
Models", Transformer Circuits Thread, 2026): one ``[d, d]`` matrix per block, ``J_l``, the average first-order
effect of block ``l``'s output on the last block's output; a row is read as ``W_U norm(J_l h_l)`` through the
model's own final norm and unembedding (``J_l = I`` is the logit lens).

A ``JacobianLens`` is a lens in this package's sense: ``affine(rows, d_model)`` hands ``J_l - I`` over as the
residual weight (``h + h @ (J_l - I).T = h @ J_l.T``), so every ``lens=`` entry point of both backends, the
remote traces (the tensors ship with the request) and ``evaluate_lenses`` take it unchanged. Layer ``l`` is
block ``l``'s output: rows ``{l}_post`` and ``{l+1}_pre`` (``hidden_index`` ``l + 1``). The last block's output
is decoded as it is (its row is the model's output); the embeddings (row ``embed``) and points inside a
block have no matrix and are refused, not decoded by another lens.

Files are the reference format that TransformerLens 4.3 and the published lenses (``neuronpedia/jacobian-lens``)
use, so they move both ways: a ``torch.save`` dict with ``J`` (``{layer: [d, d]}``, float16 by default),
``n_prompts``, ``source_layers``, ``d_model`` and an optional ``metadata`` dict of plain values; a fit checkpoint
holds ``jacobian_sum`` (running sums over prompts) and ``n_done`` instead. Files are read with
``weights_only=True`` (no code runs). Lenses fitted on disjoint prompts ``merge`` into their prompt-weighted mean.

Mid-block matrices (an extension; the reference fits block outputs only): ``J_mid[l]`` is the same estimator
with block ``l``'s ``mid`` residual (between its attention and MLP) as the source, ``d h_final / d h_mid,l``,
and maps row ``{l}_mid``; every block has one, the last included (its MLP still lies between). A file saves
them under the extra top-level keys ``J_mid`` (``{layer: [d, d]}``) and ``mid_layers``; a fit checkpoint under
``jacobian_sum_mid``. TransformerLens 4.3's ``JacobianLens.load`` reads only the keys it knows, so it still
loads the ordinary layers of such a file.

Lens vectors (row ``t`` of ``W_U J_l``, i.e. ``J_l^T W_U[:, t]`` in layer-``l`` coordinates) give the
interventions ``steering``, ``ablation`` and ``swap``: an ``Edit`` that runs as TransformerLens hooks or inside
an nnsight trace (remote too), with the arithmetic in ``core.jacobian``.
"""

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_plugins.core import jacobian as core_jacobian
from lens_plugins.core import lenses as core_lenses
from lens_plugins.core.errors import LensFileNotFoundError, LensKeyError, LensTypeError, LensValueError
from lens_plugins.core.rows import Row
from lens_plugins.files import atomic_write, check_file, load_tensors

ESTIMATOR = "jacobian_lens"  # recorded as metadata["estimator"], as TransformerLens records it
DEFAULT_SKIP_FIRST = 16  # attention-sink positions left out of the source average (the reference default)
HUB_REPO = "neuronpedia/jacobian-lens"
REGISTRY = Path(__file__).with_name("jacobian_registry.json")
# A shipped lens above this many bytes is decoded on the client instead (see ``remote_route``): the request
# carries the tensors, and a 70B model's lens is ~10.7 GB in float16.
SHIP_LIMIT_BYTES = 256 * 2**20


def check_metadata(metadata: Any, where: str = "metadata") -> None:
    """Refuse metadata that ``torch.load(weights_only=True)`` could not read back (only None, bool, int, float,
    str, lists, tuples and string-keyed dicts), naming the offending key."""
    if metadata is None or type(metadata) in (bool, int, float, str):
        return
    if type(metadata) in (list, tuple):
        for i, item in enumerate(metadata):
            check_metadata(item, f"{where}[{i}]")
        return
    if type(metadata) is dict:
        for key, item in metadata.items():
            if type(key) is not str:
                raise LensTypeError(f"{where} has the key {key!r}: metadata keys must be strings")
            check_metadata(item, f"{where}.{key}")
        return
    raise LensTypeError(f"{where} is a {type(metadata).__name__}: metadata holds only None, bool, int, float, str, "
                        "lists, tuples and string-keyed dicts (what a weights_only load reads back)")


@dataclass
class Edit:
    """An intervention built from lens vectors: what it does, and the per-layer edits as plain tensors.

    ``kind`` is ``steer``, ``ablate`` or ``swap``; ``layers`` the block outputs it edits; ``tokens`` the token ids
    it acts on; ``specs`` one dict per layer for ``core.jacobian.edit``. Run it with
    ``lp.transformer_lens.jacobian_hooks(edit)`` (``fwd_hooks``) or ``lp.nnsight.jacobian_edit(model, edit)``
    inside a trace, or measure it with ``run_jacobian_edit`` on either backend.
    """

    kind: str
    layers: list[int]
    tokens: list[int]
    positions: Optional[list[int]]
    specs: dict[int, dict] = field(repr=False)

    def describe(self) -> str:
        where = "every position" if self.positions is None else f"positions {self.positions}"
        return f"{self.kind} tokens {self.tokens} at block outputs {self.layers}, {where}"


@dataclass
class Decomposition:
    """A residual vector as a sparse nonnegative combination of lens vectors (``JacobianLens.decompose``).

    ``support`` are the token ids whose lens vectors carry a material coefficient (``coordinates``, aligned);
    ``selected`` every token the pursuit selected; ``reconstruction`` the combination; ``j_space`` the projection
    of the vector on the selected lens vectors' span and ``non_j_space`` what is left (orthogonal to it)."""

    layer: int
    support: Int[Tensor, " active"]
    coordinates: Float[Tensor, " active"]
    selected: Int[Tensor, " selected"]
    reconstruction: Float[Tensor, " d_model"]
    j_space: Float[Tensor, " d_model"]
    non_j_space: Float[Tensor, " d_model"]
    tokens: list[str]

    def explained(self) -> float:
        """The share of the vector's squared norm in the span of the selected lens vectors."""
        total = float(self.j_space.double().norm() ** 2 + self.non_j_space.double().norm() ** 2)
        return float(self.j_space.double().norm() ** 2) / total if total else 0.0


class JacobianLens:
    """Per-block transport matrices ``J_l [d, d]`` (float32 in memory), read as ``W_U norm(J_l h_l)``.

    Make one with ``JacobianLens.fit(model, texts)`` (either backend), ``JacobianLens.load(path)`` or
    ``JacobianLens.from_pretrained(name)``; pass it as ``lens=`` anywhere a lens goes.
    """

    def __init__(self, jacobians: dict[int, Tensor], *, n_prompts: int, d_model: int,
                 metadata: Optional[dict] = None, mid_jacobians: Optional[dict[int, Tensor]] = None):
        if not jacobians:
            raise LensValueError("a Jacobian lens needs at least one layer's matrix")
        for name, matrices in (("J", jacobians), ("J_mid", mid_jacobians or {})):
            for layer, matrix in matrices.items():
                if not isinstance(matrix, Tensor):
                    raise LensTypeError(f"{name}[{layer}] is a {type(matrix).__name__}, not a tensor")
                if tuple(matrix.shape) != (d_model, d_model):
                    raise LensValueError(f"{name}[{layer}] has shape {tuple(matrix.shape)}, but d_model={d_model} "
                                         f"needs ({d_model}, {d_model})")
                if int(layer) < 0:
                    raise LensValueError(f"{name} has a matrix for layer {layer}: layers are block indices from 0")
        check_metadata(metadata)
        self.jacobians = {int(layer): matrix.detach().float().cpu() for layer, matrix in jacobians.items()}
        # block l's mid residual (between attention and MLP) -> the last block's output; empty for most lenses
        self.mid_jacobians = {int(layer): matrix.detach().float().cpu()
                              for layer, matrix in (mid_jacobians or {}).items()}
        self.n_prompts = int(n_prompts)
        self.d_model = int(d_model)
        self.metadata = dict(metadata or {})

    # -- what it is ------------------------------------------------------------------------------------------

    # The matrices act on raw Hugging Face activations: a TransformerLens model whose weights were folded or
    # centred has another residual basis, and the TransformerLens lens refuses it (``check_raw``).
    raw_basis = True

    @property
    def source_layers(self) -> list[int]:
        return sorted(self.jacobians)

    @property
    def mid_layers(self) -> list[int]:
        """The blocks whose ``mid`` row has a matrix (``J_mid``); empty for a lens of block outputs only."""
        return sorted(self.mid_jacobians)

    @property
    def n_layers(self) -> Optional[int]:
        """The depth of the model it was fitted on, when recorded (``metadata["target_layer"] + 1``)."""
        target = self.metadata.get("target_layer")
        return int(target) + 1 if isinstance(target, int) else None

    @property
    def made_for(self) -> dict:
        """What ``core.lenses.check_fits`` compares with the model decoding: width, depth (when recorded) and,
        for a lens fitted by this package, the model's unembedding fingerprint."""
        return {"model": self.metadata.get("model_name"), "d_model": self.d_model, "n_layers": self.n_layers,
                "fingerprint": self.metadata.get("model_fingerprint")}

    def __repr__(self) -> str:
        layers, mids = self.source_layers, self.mid_layers
        mid = f", mid_layers={mids[0]}..{mids[-1]} ({len(mids)})" if mids else ""
        return (f"JacobianLens(layers={layers[0]}..{layers[-1]} ({len(layers)}){mid}, d_model={self.d_model}, "
                f"n_prompts={self.n_prompts})")

    def nbytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the matrices in ``dtype``: what a remote request ships (float32) or a file holds."""
        count = len(self.jacobians) + len(self.mid_jacobians)
        return count * self.d_model ** 2 * torch.empty((), dtype=dtype).element_size()

    def check_model(self, model) -> "JacobianLens":
        """Refuse a model this lens was not fitted for: width, depth, source layers beyond its last block, and
        the recorded unembedding fingerprint (the message every lens entry point gives)."""
        from lens_plugins.backends.hf import hf_model

        config = hf_model(model).config
        n_layers = config.num_hidden_layers
        core_lenses.check_fits(self.made_for, config.hidden_size, n_layers, decoder_of(model))
        self._check_depth(n_layers)
        return self

    def _check_depth(self, n_layers: int) -> None:
        beyond = [layer for layer in self.source_layers if layer >= n_layers - 1]
        if beyond:
            raise LensValueError(f"this Jacobian lens has matrices for block outputs {beyond}, but the model's "
                                 f"{n_layers} blocks leave only 0..{n_layers - 2} (the last block's output is "
                                 "decoded as it is): the lens was fitted on a deeper model")
        beyond = [layer for layer in self.mid_layers if layer >= n_layers]
        if beyond:
            raise LensValueError(f"this Jacobian lens has mid-block matrices for blocks {beyond}, but the model has "
                                 f"{n_layers} blocks: the lens was fitted on a deeper model")

    # -- the lens seam ---------------------------------------------------------------------------------------

    def matrix_layer(self, row: Row, n_layers: int) -> Optional[int]:
        """The block whose matrix maps ``row`` (``None``: the last block's output, decoded as it is); for a
        ``{l}_mid`` row of a lens with mid-block matrices, ``l`` (its matrix is ``J_mid[l]``, see ``matrix``)."""
        if row.site == "mid" and self.mid_jacobians:
            if row.layer not in self.mid_jacobians:
                raise LensKeyError(f"row {row.label!r} is block {row.layer}'s mid point, which this Jacobian lens has "
                                   f"no matrix for (it has mid matrices for {self.mid_layers}): choose rows with "
                                   "layers=")
            return row.layer
        index = row.hidden_index
        if index is None or index == 0:
            what = "the embeddings" if index == 0 else "a point inside a block or a sublayer's own write"
            mid = (" (a lens fitted with mid_layers= has matrices for the mid rows)" if row.site == "mid" else "")
            raise LensValueError(
                f"the Jacobian lens has a matrix per block output, and row {row.label!r} is {what}{mid}: decode it "
                f"with the logit lens, or leave it out (layers=range(1, {n_layers + 1}) keeps every block output of "
                "the default rows; drop resid_mid / sublayers)")
        if index == n_layers:
            return None
        layer = index - 1
        if layer not in self.jacobians:
            raise LensKeyError(f"row {row.label!r} is block {layer}'s output, which this Jacobian lens has no matrix "
                               f"for (it has {self.source_layers}): choose rows with layers=")
        return layer

    def matrix(self, row: Row, n_layers: int) -> Optional[Tensor]:
        """The ``[d, d]`` matrix that maps ``row`` (``None``: the final row, decoded as it is)."""
        layer = self.matrix_layer(row, n_layers)
        if layer is None:
            return None
        return self.mid_jacobians[layer] if row.site == "mid" else self.jacobians[layer]

    def covers(self, row: Row, n_layers: int) -> bool:
        """Whether ``row`` has a matrix here (or is the final row); ``evaluate_lenses`` scores only those."""
        try:
            self.matrix_layer(row, n_layers)
        except (LensValueError, LensKeyError):
            return False
        return True

    def affine(self, rows: Sequence[Row], d_model: int, n_layers: Optional[int] = None) -> tuple[Tensor, None]:
        """``(J_l - I per row [rows, d, d], None)``: the residual form of ``h @ J_l.T`` (zeros for the final
        row). The model's depth is ``n_layers`` when given, else ``rows[-1]`` is the model's final row, as every
        entry point passes a row selection."""
        n_layers = n_layers or rows[-1].layer + 1
        core_lenses.check_fits(self.made_for, d_model, n_layers)
        self._check_depth(n_layers)
        weight = torch.zeros(len(rows), d_model, d_model)
        eye = torch.eye(d_model)
        for r, row in enumerate(rows):
            matrix = self.matrix(row, n_layers)
            if matrix is not None:
                weight[r] = matrix - eye
        return weight, None

    def transform(self, resid: Float[Tensor, "rows tokens d_model"], rows: Sequence[Row]) -> Float[Tensor, "rows tokens d_model"]:
        """Each row's residual mapped by its block's matrix (the lens-seam contract)."""
        if resid.shape[0] != len(rows):
            raise LensValueError(f"{len(rows)} rows for a residual stack of {resid.shape[0]}")
        if resid.shape[-1] != self.d_model:
            raise LensValueError(f"residual vectors have width {resid.shape[-1]}, but this Jacobian lens was fitted "
                                 f"for d_model={self.d_model}: the activations come from another model")
        # Any rows, in any number (a causal check maps one row): the depth is the fitted model's when recorded.
        return core_lenses.apply_affine(resid, *self.affine(rows, resid.shape[-1], self.made_for.get("n_layers")))

    def transport(self, h: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "... d_model"]:
        """``J_layer h`` in float32: block ``layer``'s output in the last block's output basis."""
        if layer not in self.jacobians:
            raise LensKeyError(f"this Jacobian lens has no matrix for block {layer}; it has {self.source_layers}")
        return h.float() @ self.jacobians[layer].to(h.device).T

    # -- files -----------------------------------------------------------------------------------------------

    def save(self, path: Union[str, os.PathLike], *, dtype: torch.dtype = torch.float16,
             overwrite: bool = False) -> Path:
        """Write the reference format (``J``, ``n_prompts``, ``source_layers``, ``d_model``, ``metadata``) to the
        file ``path``, in ``dtype`` (float16 by default, as the reference: entries are of order one), with
        ``J_mid`` and ``mid_layers`` for a lens with mid-block matrices. An existing file is replaced only with
        ``overwrite=True``; the file is staged and renamed into place."""
        path = check_file(path, overwrite=overwrite)
        payload = {"J": {layer: matrix.to(dtype) for layer, matrix in self.jacobians.items()},
                   "n_prompts": self.n_prompts, "source_layers": self.source_layers, "d_model": self.d_model}
        if self.mid_jacobians:
            payload["J_mid"] = {layer: matrix.to(dtype) for layer, matrix in self.mid_jacobians.items()}
            payload["mid_layers"] = self.mid_layers
        if self.metadata:
            payload["metadata"] = self.metadata
        with atomic_write(path) as staging:
            torch.save(payload, staging)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike], model=None) -> "JacobianLens":
        """A lens from an artifact (``J``) or a fit checkpoint (``jacobian_sum`` / ``n_done``: the means are
        rebuilt), read with ``weights_only=True``. With ``model``, a lens for another model is refused here."""
        if not Path(path).is_file():
            raise LensFileNotFoundError(f"{path} is not a file: a Jacobian lens is one .pt file (give its path, or "
                                        "use JacobianLens.from_pretrained for a published lens)")
        payload = load_tensors(path, "a Jacobian lens file holds tensors and plain values only; if you trust it, "
                                     "load it yourself and save its tensors")
        lens = cls.from_payload(payload, str(path))
        if model is not None:
            lens.check_model(model)
        return lens

    @classmethod
    def from_payload(cls, payload: Any, where: str = "the payload") -> "JacobianLens":
        """A lens from a loaded artifact or fit-checkpoint dict (see ``load``)."""
        if not isinstance(payload, dict):
            raise LensValueError(f"{where} holds a {type(payload).__name__}, not a Jacobian lens dict")
        metadata = payload.get("metadata") or {}
        if "J" in payload:
            matrices, n_prompts = payload["J"], payload.get("n_prompts", 0)
            mids = payload.get("J_mid") or {}
        elif "jacobian_sum" in payload:
            n_prompts = payload.get("n_done", 0)
            if not isinstance(n_prompts, int) or n_prompts <= 0:
                raise LensValueError(f"{where} is a fit checkpoint with n_done={n_prompts!r}: no prompt was fitted")
            matrices = {layer: total.float() / n_prompts for layer, total in payload["jacobian_sum"].items()}
            mids = {layer: total.float() / n_prompts for layer, total in (payload.get("jacobian_sum_mid") or {}).items()}
            metadata = {**metadata, "converted_from": "jacobian_lens_checkpoint"}
            if isinstance(payload.get("target_layer"), int):
                metadata.setdefault("target_layer", payload["target_layer"])
        else:
            raise LensValueError(f"{where} is not a Jacobian lens: expected a 'J' key (a lens) or 'jacobian_sum' "
                                 f"(a fit checkpoint), found {sorted(map(str, payload))[:6]}")
        if not isinstance(matrices, dict) or not matrices:
            raise LensValueError(f"{where}: the matrices are not a non-empty {{layer: tensor}} dict")
        if not isinstance(mids, dict):
            raise LensValueError(f"{where}: J_mid is not a {{layer: tensor}} dict")
        for name, found in (("J", matrices), ("J_mid", mids)):
            for layer, matrix in found.items():
                if not isinstance(matrix, Tensor):
                    raise LensValueError(f"{where}: {name}[{layer}] is a {type(matrix).__name__}, not a tensor")
                if not bool(torch.isfinite(matrix).all()):
                    raise LensValueError(f"{where}: {name}[{layer}] holds NaN or inf (a damaged file, or a float16 "
                                         "overflow when it was saved); refit, or load an earlier copy")
        d_model = payload.get("d_model", next(iter(matrices.values())).shape[0])
        return cls({int(layer): matrix for layer, matrix in matrices.items()}, n_prompts=int(n_prompts),
                   d_model=int(d_model), metadata=metadata,
                   mid_jacobians={int(layer): matrix for layer, matrix in mids.items()})

    @staticmethod
    def hub_file(name: str) -> Optional[tuple[str, str, str]]:
        """``(repo_id, filename, revision)`` of a published lens for a short model name or Hugging Face model id
        (``"gemma-2-2b"``, ``"google/gemma-2-2b"``), from the registry TransformerLens 4.3 ships (copied here,
        pinned at one hub commit); ``None`` when the name is not there."""
        registry = json.loads(REGISTRY.read_text(encoding="utf-8"))
        for key, entry in registry.items():
            if isinstance(entry, dict) and (name == key or name in entry.get("aliases", [])):
                return entry["repo_id"], entry["filename"], registry["revision"]
        return None

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, filename: str = "lens.pt", revision: Optional[str] = None,
                        model=None) -> "JacobianLens":
        """A local file, a file in a local directory, a published lens by short name or model id (resolved by
        ``hub_file``), or ``filename`` in the hub repository ``name_or_path``. Downloading needs network and
        ``huggingface_hub``; the file is then read like any other (``weights_only``)."""
        local = Path(name_or_path)
        if local.is_file():
            return cls.load(local, model)
        if local.is_dir():
            return cls.load(local / filename, model)
        resolved = cls.hub_file(name_or_path)
        repo_id, remote_name, pinned = resolved if resolved else (name_or_path, filename, None)
        try:
            from huggingface_hub import hf_hub_download

            downloaded = hf_hub_download(repo_id=repo_id, filename=remote_name, revision=revision or pinned)
        except Exception as error:  # noqa: BLE001 - offline, unknown name, hub down: one message for all
            raise LensFileNotFoundError(
                f"{name_or_path!r} is not a local file or directory, and downloading {remote_name} from the hub "
                f"repository {repo_id} failed ({type(error).__name__}: {error}). Check the name (published: "
                f"{cls.published()[:6]} ...) and your network, or pass a local path") from error
        return cls.load(downloaded, model)

    @staticmethod
    def published() -> list[str]:
        """The short model names with a published lens in the registry."""
        registry = json.loads(REGISTRY.read_text(encoding="utf-8"))
        return [key for key, entry in registry.items() if isinstance(entry, dict)]

    @classmethod
    def merge(cls, lenses: Sequence["JacobianLens"]) -> "JacobianLens":
        """The prompt-weighted mean of lenses fitted on disjoint prompts (equal to one fit on all of them), for a
        fit split across processes or machines. They must share layers, width and provenance (but ``n_prompts``)."""
        lenses = list(lenses)
        if not lenses:
            raise LensValueError("merge needs at least one lens")
        if any(lens.n_prompts <= 0 for lens in lenses):
            raise LensValueError(f"every lens merged needs n_prompts > 0; got {[lens.n_prompts for lens in lenses]}")
        first = lenses[0]
        provenance = {key: value for key, value in first.metadata.items() if key != "n_prompts"}
        for other in lenses[1:]:
            if other.source_layers != first.source_layers or other.d_model != first.d_model \
                    or other.mid_layers != first.mid_layers:
                raise LensValueError("lenses merged must have the same source layers, mid layers and d_model; got "
                                     f"{first.source_layers} / {first.mid_layers} / {first.d_model} and "
                                     f"{other.source_layers} / {other.mid_layers} / {other.d_model}")
            theirs = {key: value for key, value in other.metadata.items() if key != "n_prompts"}
            if theirs != provenance:
                differ = sorted(k for k in set(theirs) | set(provenance) if theirs.get(k) != provenance.get(k))
                raise LensValueError(f"lenses merged must share their provenance (metadata {differ} differ): they "
                                     "were fitted on other models or with other settings")
        total = sum(lens.n_prompts for lens in lenses)
        merged = {layer: torch.stack([lens.jacobians[layer].double() * lens.n_prompts for lens in lenses]).sum(0)
                  / total for layer in first.source_layers}
        mids = {layer: torch.stack([lens.mid_jacobians[layer].double() * lens.n_prompts for lens in lenses]).sum(0)
                / total for layer in first.mid_layers}
        metadata = dict(first.metadata)
        if metadata:
            metadata["n_prompts"] = total
        return cls({layer: m.float() for layer, m in merged.items()}, n_prompts=total, d_model=first.d_model,
                   metadata=metadata, mid_jacobians={layer: m.float() for layer, m in mids.items()})

    @classmethod
    def fit(cls, model, texts=None, **options) -> "JacobianLens":
        """Fit on ``model`` (TransformerBridge, nnsight or Hugging Face): see
        ``lens_plugins.training.jacobian_lens.fit_jacobian_lens`` for the options."""
        from lens_plugins.training.jacobian_lens import fit_jacobian_lens

        return fit_jacobian_lens(model, texts, **options)

    # -- lens vectors and interventions ----------------------------------------------------------------------

    def lens_vectors(self, model, tokens, layer: int) -> Float[Tensor, "n d_model"]:
        """``[n, d]`` float32: for each token, ``J_layer^T W_U[:, t]``, the direction in block ``layer``'s output
        that the lens reads as that token. ``tokens``: a token string (one token), an id, or a list of them."""
        self.check_model(model)
        ids = token_ids(model, tokens)
        W_U = decoder_of(model).W_U
        columns = W_U[:, ids].float()
        matrix = self.jacobians.get(layer)
        if matrix is None:
            raise LensKeyError(f"this Jacobian lens has no matrix for block {layer}; it has {self.source_layers}")
        return (matrix.to(columns.device).T @ columns).T

    def decompose(self, model, activation: Float[Tensor, " d_model"], layer: int, *, k: int = 25) -> Decomposition:
        """``activation`` (block ``layer``'s output at one position, ``[d_model]``) as a ``k``-sparse nonnegative
        combination of lens vectors, by nonnegative orthogonal matching pursuit (``core.jacobian.decompose``; the
        reference implementation's algorithm and tolerances). Memory: the ``[vocab, d]`` dictionary is read in
        chunks, never held."""
        if not isinstance(activation, Tensor) or activation.ndim != 1 or activation.shape[0] != self.d_model:
            raise LensValueError(f"decompose takes one residual vector [d_model={self.d_model}], got "
                                 f"{tuple(activation.shape) if isinstance(activation, Tensor) else type(activation).__name__}")
        self.check_model(model)
        if layer not in self.jacobians:
            raise LensKeyError(f"this Jacobian lens has no matrix for block {layer}; it has {self.source_layers}")
        W_U = decoder_of(model).W_U
        found = core_jacobian.decompose(activation.detach().to(W_U.device), self.jacobians[layer], W_U.detach(), k)
        tokenizer = getattr(model, "tokenizer", None)
        tokens = tokenizer.convert_ids_to_tokens(found["support"].tolist()) if tokenizer is not None else []
        return Decomposition(layer=layer, support=found["support"], coordinates=found["coordinates"],
                             selected=found["selected"], reconstruction=found["reconstruction"],
                             j_space=found["j_space"], non_j_space=found["non_j_space"], tokens=tokens)

    def steering(self, model, token, layers: Sequence[int], *, alpha: float = 4.0,
                 positions: Optional[Sequence[int]] = None) -> Edit:
        """Add ``token``'s unit lens vector at each layer, scaled by ``alpha`` times the median residual norm of
        the edited positions (the reference protocol's norm-matched steering)."""
        ids = token_ids(model, token)
        if len(ids) != 1:
            raise LensValueError(f"steering takes one token, got {len(ids)}")
        specs = {}
        for layer in _layers(layers):
            unit = core_jacobian.unit_rows(self.lens_vectors(model, ids, layer), layer)[0]
            specs[layer] = {"kind": "steer", "unit": unit, "alpha": float(alpha), "positions": _positions(positions)}
        return Edit("steer", sorted(specs), ids, _positions(positions), specs)

    def ablation(self, model, tokens, layers: Sequence[int], *, positions: Optional[Sequence[int]] = None) -> Edit:
        """Project the span of the tokens' lens vectors out of each layer's residual (``h - Q Q^T h``)."""
        ids = token_ids(model, tokens)
        specs = {}
        for layer in _layers(layers):
            units = core_jacobian.unit_rows(self.lens_vectors(model, ids, layer), layer)
            specs[layer] = {"kind": "ablate", "basis": core_jacobian.orthonormal_basis(units, layer),
                            "positions": _positions(positions)}
        return Edit("ablate", sorted(specs), ids, _positions(positions), specs)

    def swap(self, model, source_token, target_token, layers: Sequence[int], *, alpha: float = 1.0,
             positions: Optional[Sequence[int]] = None) -> Edit:
        """Exchange two concepts' lens coordinates by the pseudoinverse of ``[v_source, v_target]`` (``alpha=2``:
        the paper's double-strength swap); what lies outside their span is untouched."""
        ids = token_ids(model, [source_token, target_token])
        if ids[0] == ids[1]:
            raise LensValueError(f"the source and target tokens are the same token ({ids[0]}): a swap would do "
                                 "nothing")
        specs = {}
        for layer in _layers(layers):
            vectors = self.lens_vectors(model, ids, layer)
            core_jacobian.unit_rows(vectors, layer)
            basis = vectors.T.contiguous()
            specs[layer] = {"kind": "swap", "basis": basis, "pinv": torch.linalg.pinv(basis), "alpha": float(alpha),
                            "positions": _positions(positions)}
        return Edit("swap", sorted(specs), ids, _positions(positions), specs)


def decoder_of(model):
    """The model's decoder (final norm, ``W_U``): TransformerLens's reader for a bridge (booting one rewires
    the Hugging Face modules), the Hugging Face reader for an nnsight or plain model."""
    from lens_plugins.backends import kind
    from lens_plugins.backends.hf import decoder_tensors, hf_model

    try:
        backend = kind(model)
    except LensTypeError:
        backend = "hf"
    if backend == "transformer_lens":
        from lens_plugins.backends.transformer_lens.verification import decoder_for

        return decoder_for(model)
    return decoder_tensors(hf_model(model))


def token_ids(model, tokens) -> list[int]:
    """Token ids of ``tokens`` (one or a list of: an id, or a string that is exactly one token of the model's
    tokenizer), by the rule every target of this package follows (``core.request.single_token_id``)."""
    from lens_plugins.core.request import single_token_id

    items = [tokens] if isinstance(tokens, (str, int)) else list(tokens)
    if not items:
        raise LensValueError("no token given")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None and any(isinstance(item, str) for item in items):
        raise LensValueError("this model carries no tokenizer, so tokens must be given as ids (or wrap it with "
                             "lp.nnsight.wrap_model(model, tokenizer))")
    d_vocab = decoder_of(model).d_vocab
    return [single_token_id(tokenizer, item, d_vocab) for item in items]


def _layers(layers) -> list[int]:
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers or any(isinstance(layer, bool) or not isinstance(layer, int) for layer in layers):
        raise LensValueError(f"layers= takes block indices (ints), got {layers!r}")
    return sorted(set(layers))


def _positions(positions) -> Optional[list[int]]:
    if positions is None:
        return None
    positions = [positions] if isinstance(positions, int) else list(positions)
    if not positions:
        raise LensValueError("positions= is empty: give at least one position, or None for every position")
    return positions

__all__ = ["ESTIMATOR", "DEFAULT_SKIP_FIRST", "HUB_REPO", "REGISTRY", "SHIP_LIMIT_BYTES", "check_metadata", "Edit", "Decomposition",
           "JacobianLens", "decoder_of", "token_ids"]
