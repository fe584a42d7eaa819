"""The package's files: read without running code, written without destroying anything.

Reading: every ``.pt`` file the package loads (a tuned lens's ``params.pt``, a saved Future Lens, a training
checkpoint) goes through ``load_tensors``, ``torch.load(weights_only=True)``, which rebuilds tensors and plain
containers (dicts, lists, numbers, strings) and nothing else. A full pickle may name any callable to run while it
is read, so a lens or a checkpoint directory from someone else could run code on this machine.

Writing: ``check_file`` and ``check_dir`` run before any slow work (a training run must not end in a path error),
refuse to write into a model's directory (its ``config.json`` and weights are not ours to replace) and refuse an
existing output unless the caller passes ``overwrite=True`` (``--force`` on the command line); ``atomic_write``
stages a file beside its target and renames it into place (``os.replace``), so an interrupted write leaves the
old file or none, never half of one.
"""

import json
import os
import pickle
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Union

from lens_plugins.core.errors import LensValueError

PathLike = Union[str, os.PathLike]
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
OVERWRITE_HINT = "pass overwrite=True (--force on the command line) to replace it, or choose another path"


def load_tensors(path: PathLike, fix: str):
    """``torch.load(path, weights_only=True)`` on the CPU; a file holding any other object is refused, naming the
    file and ``fix`` (what to do instead), and nothing in it runs."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line), "")
        raise LensValueError(
            f"{path} holds Python objects, not only tensors and plain containers{f' ({detail})' if detail else ''}; "
            f"lens_plugins does not unpickle those, because unpickling can run code: {fix}"
        ) from None


def is_model_dir(path: PathLike) -> bool:
    """Whether ``path`` is a model's directory: a Hugging Face ``config.json`` (one naming a ``model_type`` or
    ``architectures``; a tuned lens's own ``config.json`` names neither) or model weights."""
    path = Path(path)
    if any((path / name).exists() for name in WEIGHT_FILES):
        return True
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ("model_type" in config or "architectures" in config)


def _check_writable_parent(path: Path, shown: PathLike) -> None:
    """The nearest existing ancestor of ``path`` is a directory this process may write to."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LensValueError(f"cannot write {shown}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LensValueError(f"cannot write {shown}: directory {parent} is not writable")


def check_file(path: PathLike, *, overwrite: bool = False) -> Path:
    """Refuse, before any work, a file output that cannot or should not be written: a directory, a missing or
    read-only parent directory, or an existing file without ``overwrite``."""
    target = Path(path)
    if target.is_dir():
        raise LensValueError(f"cannot write {path}: it is a directory; give a file name")
    parent = target.absolute().parent
    if not parent.is_dir():
        raise LensValueError(f"cannot write {path}: directory {parent} does not exist")
    _check_writable_parent(target, path)
    if target.exists() and not overwrite:
        raise LensValueError(f"{path} already exists: {OVERWRITE_HINT}")
    return target


def check_dir(path: PathLike, files: Sequence[str] = (), *, overwrite: bool = False) -> Path:
    """Refuse, before any work, a directory output that cannot or should not be written: a file, a model's
    directory (never, whatever ``overwrite`` says), one whose parents cannot be made, or one already holding any
    of ``files`` without ``overwrite``."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise LensValueError(f"cannot write into {path}: it is a file, not a directory")
    if is_model_dir(target):
        raise LensValueError(f"{path} is a model's directory (config.json, weights): lens_plugins never writes "
                             "into one; choose another directory")
    if target.is_dir():
        if not os.access(target, os.W_OK | os.X_OK):
            raise LensValueError(f"cannot write into {path}: the directory is not writable")
    else:
        _check_writable_parent(target, path)
    present = [name for name in files if (target / name).exists()]
    if present and not overwrite:
        raise LensValueError(f"{path} already holds {', '.join(present)}: {OVERWRITE_HINT}")
    return target


@contextmanager
def atomic_write(path: PathLike) -> Iterator[Path]:
    """Yield a staging path beside ``path`` for the caller to write; on success it replaces ``path`` in one
    rename, on an error (or Ctrl-C) it is removed and ``path`` is left as it was. The staging file is named
    here, not created (as ``mkstemp`` would, mode 0600), so the written file gets the usual permissions."""
    target = Path(path)
    staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    try:
        yield staging
        os.replace(staging, target)
    finally:
        if staging.exists():
            staging.unlink()


__all__ = ["WEIGHT_FILES", "OVERWRITE_HINT", "load_tensors", "is_model_dir", "check_file", "check_dir",
           "atomic_write"]
