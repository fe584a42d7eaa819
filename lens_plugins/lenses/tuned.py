"""The tuned lens (Belrose et al. 2023): one learned affine translator per hidden state, read through the
model's own final norm and unembedding.

A ``TunedLens`` is a lens in the sense of the lens seam: ``transform(resid, rows)`` maps each row's residual
to the vector the decoder reads, ``h + W_i h + b_i`` with ``i = row.hidden_index`` (Hugging Face
``output_hidden_states`` indexing: 0 = embeddings, ``i`` = the input of block ``i``, ``n_layers`` = the last
block's output, which is decoded as it is), and ``affine(rows, d_model)`` hands the same maps over as
tensors, so a remote trace can ship them and apply them on the server. Every reduction, plot and sublayer-free
row of the logit lens then works for the tuned lens unchanged.

The checkpoint format is tuned-lens's, so lenses move both ways: a directory with ``config.json``
(``base_model_name_or_path``, ``d_model``, ``num_hidden_layers``, ``bias``, ``base_model_revision``,
``unembed_hash``, ``lens_type``; other keys are kept and written back) and ``params.pt``, the state dict of a
``ModuleList`` of ``num_hidden_layers`` ``Linear(d_model, d_model)`` (``"{i}.weight"``, ``"{i}.bias"``).
A lens made here also records ``model_fingerprint`` (``core.lenses.fingerprint``: vocabulary size and a
512-entry probe of ``W_U``), so that a lens is refused on another model of the same shape; tuned-lens
ignores the key, and a lens without it is checked on width and depth alone.
Translators start at zero, so an untrained tuned lens is exactly the logit lens and weight decay pulls
toward it.

Mid-block translators (an extension; tuned-lens has none): a lens made with ``resid_mid=True`` also holds one
translator per block for its ``{l}_mid`` row, the residual between attention and MLP. They are saved beside
the ordinary files, in ``mid_params.pt`` (the state dict of a second ``ModuleList`` of ``num_hidden_layers``
translators, ``"{l}.weight"`` / ``"{l}.bias"`` for block ``l``'s mid row), and ``config.json`` gains
``"resid_mid": true``. ``params.pt`` is unchanged, so tuned-lens's own loader (which drops config keys it does
not know and loads ``params.pt`` strictly) still loads the ordinary rows of such a lens.
"""

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

from lens_plugins.core import lenses as core_lenses
from lens_plugins.core.errors import LensFileNotFoundError, LensValueError
from lens_plugins.core.rows import Row
from lens_plugins.files import atomic_write, check_dir, load_tensors
from lens_plugins.typecheck import typechecked

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.pt"
MID_PARAMS_FILE = "mid_params.pt"  # the mid-block translators (an extension of the layout)
HUB_REPO = "AlignmentResearch/tuned-lens"  # where tuned-lens publishes its lenses: a Space, under lens/<model>


class _TrainOrMode:
    """``TunedLens.train(model, texts, ...)`` trains a new lens; ``lens.train(mode)`` on an instance is
    ``torch.nn.Module.train`` (which ``eval()`` and every framework call). One name, told apart by whether
    it is looked up on the class or on an instance."""

    def __get__(self, instance, owner):
        if instance is None:
            from lens_plugins.training.tuned_lens import train_tuned_lens

            def train(model, texts=None, **kwargs):
                return train_tuned_lens(model, texts, **kwargs)

            train.__doc__ = train_tuned_lens.__doc__
            return train
        return torch.nn.Module.train.__get__(instance, owner)


class TunedLens(torch.nn.Module):
    """Per-hidden-state affine translators, applied residually: ``h + h @ W_i.T + b_i``.

    Build one for a model with ``TunedLens.for_model(model)`` (zero translators: the logit lens), train one
    with ``TunedLens.train(model, texts, steps=...)``, read one with ``TunedLens.load(path)``. With
    ``resid_mid=True`` it also has a translator per block's ``{l}_mid`` row (``mid_translators``).
    """

    train = _TrainOrMode()

    def __init__(self, d_model: int, num_hidden_layers: int, bias: bool = True,
                 base_model_name_or_path: str = "", resid_mid: bool = False, **config):
        super().__init__()
        if d_model < 1 or num_hidden_layers < 1:
            raise LensValueError(f"d_model and num_hidden_layers must be positive, got {d_model} and {num_hidden_layers}")
        self.config = {
            "base_model_name_or_path": base_model_name_or_path, "d_model": d_model,
            "num_hidden_layers": num_hidden_layers, "bias": bias, "base_model_revision": None,
            "unembed_hash": None, "lens_type": "linear_tuned_lens", **config,
        }
        if resid_mid:
            self.config["resid_mid"] = True  # written only when true: a plain lens's config.json is tuned-lens's
        self.layer_translators = _zero_translators(d_model, num_hidden_layers, bias)
        # block l's mid row (between its attention and MLP); empty for a lens without them
        self.mid_translators = _zero_translators(d_model, num_hidden_layers if resid_mid else 0, bias)

    @property
    def d_model(self) -> int:
        return self.config["d_model"]

    @property
    def num_hidden_layers(self) -> int:
        return self.config["num_hidden_layers"]

    @property
    def resid_mid(self) -> bool:
        """Whether this lens has a translator per block's ``{l}_mid`` row."""
        return len(self.mid_translators) > 0

    @property
    def made_for(self) -> dict:
        """The model this lens was made for (``core.lenses.check_fits`` compares it with the model decoding):
        its name, width, depth and, for a lens made by this package, its ``model_fingerprint``."""
        return {"model": self.config["base_model_name_or_path"], "d_model": self.d_model,
                "n_layers": self.num_hidden_layers, "fingerprint": self.config.get("model_fingerprint")}

    @classmethod
    def for_model(cls, model, bias: bool = True, resid_mid: bool = False) -> "TunedLens":
        """A zero (identity) tuned lens shaped for ``model`` (HF, nnsight or TransformerBridge), recording the
        model's fingerprint so that the lens is refused on any other model; ``resid_mid=True`` adds a
        translator per block's ``{l}_mid`` row."""
        from lens_plugins.backends.hf import decoder_tensors, hf_model

        hf = hf_model(model)
        config = hf.config
        return cls(config.hidden_size, config.num_hidden_layers, bias=bias, resid_mid=resid_mid,
                   base_model_name_or_path=str(getattr(config, "name_or_path", "") or ""),
                   model_fingerprint=core_lenses.fingerprint(decoder_tensors(hf)))

    def check_model(self, model) -> None:
        """Refuse a model this lens was not made for (width, depth, and the recorded fingerprint), with the
        message every lens entry point gives (``core.lenses.check_fits``)."""
        from lens_plugins.backends.hf import decoder_tensors, hf_model

        hf = hf_model(model)
        core_lenses.check_fits(self.made_for, hf.config.hidden_size, hf.config.num_hidden_layers, decoder_tensors(hf))

    def translator_index(self, row: Row) -> int:
        """The hidden state a row reads (its translator, or ``num_hidden_layers`` for the final one); for a
        ``{l}_mid`` row of a lens with mid translators, ``l`` (see ``translator``)."""
        if row.site == "mid" and self.resid_mid:
            if row.layer >= self.num_hidden_layers:
                raise LensValueError(f"row {row.label!r} lies in block {row.layer}, beyond this lens's "
                                     f"{self.num_hidden_layers} layers: the lens was made for a shallower model")
            return row.layer
        index = row.hidden_index
        if index is None:
            hint = ("train one with mid translators (TunedLens.train(model, texts, resid_mid=True)), decode it with "
                    "the logit lens, or drop resid_mid" if row.site == "mid" else
                    "decode it with the logit lens, or drop sublayers for the tuned lens")
            raise LensValueError(
                f"the tuned lens has a translator per hidden state (embed, <i>_pre, <i>_post), and row "
                f"{row.label!r} is not one: it lies inside a block or is a sublayer's own write. This lens has no "
                f"mid-block translators: {hint}"
            )
        if index > self.num_hidden_layers:
            raise LensValueError(f"row {row.label!r} is hidden state {index}, beyond this lens's "
                             f"{self.num_hidden_layers} layers: the lens was made for a shallower model")
        return index

    def covers(self, row: Row, n_layers: int) -> bool:
        """Whether ``row`` has a translator here (or is the final row): ``evaluate_lenses`` scores only those."""
        try:
            self.translator_index(row)
        except LensValueError:
            return False
        return True

    def translator(self, row: Row) -> Optional[torch.nn.Linear]:
        """The translator that maps ``row`` (``None``: the final row, decoded as it is)."""
        index = self.translator_index(row)
        if row.site == "mid":
            return self.mid_translators[index]
        return None if index == self.num_hidden_layers else self.layer_translators[index]

    def transform_row(self, h: Tensor, row: Row) -> Tensor:
        """``h`` (float32) translated by ``row``'s translator; the final row is returned as it is."""
        h = h.float()
        translator = self.translator(row)
        return h if translator is None else h + translator(h)

    def transform_hidden(self, h: Tensor, index: int) -> Tensor:
        """Hidden state ``index`` translated (float32); the final hidden state is returned as it is."""
        h = h.float()
        if index == self.num_hidden_layers:
            return h
        return h + self.layer_translators[index](h)

    @typechecked
    def transform(self, resid: Float[Tensor, "rows tokens d_model"], rows: Sequence[Row]) -> Float[Tensor, "rows tokens d_model"]:
        """Each row's residual translated by its hidden state's translator (the lens-seam contract)."""
        if resid.shape[0] != len(rows):
            raise LensValueError(f"{len(rows)} rows for a residual stack of {resid.shape[0]}")
        if resid.shape[-1] != self.d_model:
            raise LensValueError(f"residual vectors have width {resid.shape[-1]} but this tuned lens was made for "
                             f"d_model={self.d_model}: the activations come from another model")
        return torch.stack([self.transform_row(resid[r], row) for r, row in enumerate(rows)])

    def affine(self, rows: Sequence[Row], d_model: int) -> tuple[Tensor, Optional[Tensor]]:
        """``(weight [rows, d, d], bias [rows, d] or None)`` with ``transform(h)[r] = h + h @ weight[r].T +
        bias[r]``: the translators as tensors, for a remote trace to apply (zeros for the final row). ``rows``
        is a row plan's selection (``core.rows.select``), whose last row is the model's final one, as every
        entry point passes it: a lens of another width or depth is refused here too, where
        ``lp.nnsight.lens_tensors`` turns it into tensors for a server."""
        core_lenses.check_fits(self.made_for, d_model, rows[-1].layer + 1)
        translators = [self.translator(row) for row in rows]
        weight = torch.zeros(len(rows), d_model, d_model)
        bias = torch.zeros(len(rows), d_model) if self.config["bias"] else None
        with torch.no_grad():
            for r, translator in enumerate(translators):
                if translator is not None:
                    weight[r] = translator.weight.float()
                    if bias is not None:
                        bias[r] = translator.bias.float()
        return weight, bias

    def save(self, path: Union[str, os.PathLike], *, overwrite: bool = False) -> Path:
        """Write ``config.json`` and ``params.pt`` (tuned-lens's layout) into the directory ``path``, and
        ``mid_params.pt`` for a lens with mid-block translators (the extension in the module's docstring).

        A lens already there is replaced only with ``overwrite=True``, and a model's directory never (its own
        ``config.json`` would be lost); each file is written beside its target and renamed into place, so an
        interrupted save leaves whole files.

        Args:
            path: the directory to write into (created if missing).
            overwrite: replace a lens already there.

        Returns:
            ``path``.

        Raises:
            LensValueError: a lens already there without ``overwrite``, or a model's directory.
        """
        path = check_dir(path, (CONFIG_FILE, PARAMS_FILE, MID_PARAMS_FILE), overwrite=overwrite)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_write(path / PARAMS_FILE) as staging:
            torch.save(self.layer_translators.state_dict(), staging)
        if self.resid_mid:
            with atomic_write(path / MID_PARAMS_FILE) as staging:
                torch.save(self.mid_translators.state_dict(), staging)
        elif (path / MID_PARAMS_FILE).exists():
            (path / MID_PARAMS_FILE).unlink()  # an overwritten lens's mid translators are not this lens's
        with atomic_write(path / CONFIG_FILE) as staging:
            staging.write_text(json.dumps(self.config, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike], model=None, *, revision: str = "main") -> "TunedLens":
        """A tuned lens from a checkpoint directory (written by tuned-lens or by ``save``), or, when no such
        directory exists and the name looks like a model id (``"gpt2"``, ``"EleutherAI/pythia-160m"``), from
        tuned-lens's published lenses on the Hugging Face hub (needs network and ``huggingface_hub``).
        With ``model``, a width or layer-count mismatch is refused here rather than at decoding.

        Args:
            path: a checkpoint directory, or a model id of tuned-lens's published lenses.
            model: the model it will decode; a mismatch is refused here.
            revision: the hub revision, for a model id.

        Returns:
            The ``TunedLens``.

        Raises:
            LensValueError: a config or params file that is not a tuned lens's, or does not fit ``model``.
            LensFileNotFoundError: no such directory and no published lens.
        """
        config_path, params_path = _locate(path, revision)
        config = json.loads(Path(config_path).read_text())
        missing = [key for key in ("d_model", "num_hidden_layers") if key not in config]
        if missing:
            raise LensValueError(f"{config_path} lacks {missing}: not a tuned-lens config.json")
        lens_type = config.get("lens_type", "linear_tuned_lens")
        if lens_type != "linear_tuned_lens":
            raise LensValueError(f"{config_path} holds a {lens_type!r} lens; only 'linear_tuned_lens' is supported")
        config.setdefault("bias", True)
        lens = cls(**config)
        _load_translators(lens.layer_translators, params_path, lens, config)
        if lens.resid_mid:
            mid_path = Path(params_path).with_name(MID_PARAMS_FILE)
            if not mid_path.exists():
                raise LensFileNotFoundError(f"{config_path} says the lens has mid-block translators (resid_mid), but "
                                            f"{mid_path} is missing: copy it with the lens, or drop the key to load "
                                            "the ordinary rows alone")
            _load_translators(lens.mid_translators, mid_path, lens, config)
        if model is not None:
            lens.check_model(model)
        return lens

    def extra_repr(self) -> str:
        mid = ", resid_mid=True" if self.resid_mid else ""
        return f"d_model={self.d_model}, num_hidden_layers={self.num_hidden_layers}, bias={self.config['bias']}{mid}"

    def translator_norms(self) -> list[float]:
        """Frobenius norm of each translator's weight: how far each layer's lens is from the logit lens."""
        return [math.sqrt(float(t.weight.detach().float().pow(2).sum())) for t in self.layer_translators]

    def mid_translator_norms(self) -> list[float]:
        """``translator_norms`` of the mid-block translators (empty for a lens without them)."""
        return [math.sqrt(float(t.weight.detach().float().pow(2).sum())) for t in self.mid_translators]


def _zero_translators(d_model: int, count: int, bias: bool) -> torch.nn.ModuleList:
    translators = torch.nn.ModuleList()
    for _ in range(count):
        translator = torch.nn.Linear(d_model, d_model, bias=bias)
        torch.nn.init.zeros_(translator.weight)
        if bias:
            torch.nn.init.zeros_(translator.bias)
        translators.append(translator)
    return translators


def _load_translators(translators: torch.nn.ModuleList, params_path, lens: "TunedLens", config: dict) -> None:
    """Fill ``translators`` from a state-dict file, refusing keys, shapes or values that do not fit the config."""
    state = load_tensors(params_path, "a tuned lens's params are a state dict of tensors only; if you trust "
                                      "the file, load it yourself and torch.save its tensors")
    expected = translators.state_dict()
    if set(state) != set(expected):
        extra, absent = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        raise LensValueError(
            f"{params_path} does not match its config ({lens.num_hidden_layers} translators of width "
            f"{lens.d_model}, bias={config['bias']}): unexpected keys {extra[:4]}, missing keys {absent[:4]}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise LensValueError(f"{params_path}: {key} has shape {tuple(value.shape)}, but config.json says "
                                 f"d_model={lens.d_model}")
        check_finite_tensor(value, params_path, key)
    translators.load_state_dict({k: v.float() for k, v in state.items()})


def check_finite_tensor(value: Tensor, path, key: str) -> None:
    """Refuse a saved lens tensor holding NaN or inf, naming the file and the tensor: it would make every row
    it maps NaN (a training run that diverged, a damaged file)."""
    if not bool(torch.isfinite(value).all()):
        kind = "NaN" if bool(torch.isnan(value).any()) else "inf"
        raise LensValueError(f"{path}: tensor {key!r} holds {kind} ({int((~torch.isfinite(value)).sum())} of "
                             f"{value.numel()} values non-finite), so the lens would decode NaN: the file is damaged "
                             "or its training diverged. Retrain the lens, or load an earlier checkpoint")


def _locate(path, revision: str) -> tuple[Path, Path]:
    local = Path(path)
    if (local / CONFIG_FILE).exists() and (local / PARAMS_FILE).exists():
        return local / CONFIG_FILE, local / PARAMS_FILE
    text = str(path)
    if local.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep + os.sep in text:
        raise LensFileNotFoundError(f"{path} is not a tuned-lens checkpoint: it needs {CONFIG_FILE} and {PARAMS_FILE}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise LensFileNotFoundError(f"no checkpoint directory {path!r}, and huggingface_hub is not installed to fetch "
                                "it from tuned-lens's hub repository") from None
    try:
        return tuple(Path(hf_hub_download(HUB_REPO, name, subfolder=f"lens/{text}", repo_type="space",
                                          revision=revision)) for name in (CONFIG_FILE, PARAMS_FILE))
    except Exception as error:  # noqa: BLE001 - offline, unknown model, hub down: one message for all
        raise LensFileNotFoundError(
            f"no checkpoint directory {path!r}, and downloading lens/{text} from the hub Space {HUB_REPO} failed "
            f"({type(error).__name__}: {error}). Check the model id and your network, or pass a local directory"
        ) from error

__all__ = ["CONFIG_FILE", "PARAMS_FILE", "MID_PARAMS_FILE", "HUB_REPO", "TunedLens", "check_finite_tensor"]
