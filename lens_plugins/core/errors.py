"""The errors lens_plugins raises: every one is a ``LensError``, and also the builtin class it replaces.

``except lp.LensError`` catches anything the package refuses; the builtin second base keeps code written
against earlier releases (``except ValueError``) working. They live in core because core raises them on an
NDIF server too (this module imports nothing, so it ships with the rest of core).
"""


class LensError(Exception):
    """Base of every error lens_plugins raises: the message says what is wrong and what to do."""


class LensValueError(LensError, ValueError):
    """An argument or an input (a prompt, a tensor, a file) has a value the package cannot use."""


class LensTypeError(LensError, TypeError):
    """An argument has a type the package cannot use."""


class LensKeyError(LensError, KeyError):
    """A name (a hook, a module path, a row label) is not where it should be."""

    def __str__(self):  # KeyError's own str() quotes the message as a repr
        return str(self.args[0]) if self.args else ""


class LensIndexError(LensError, IndexError):
    """A layer, head, position or batch index is out of range."""


class LensRuntimeError(LensError, RuntimeError):
    """The model or the environment cannot do what was asked (a remote job failed, a module returned nothing)."""


class LensNotImplementedError(LensError, NotImplementedError):
    """A model or an option the package knows but does not support."""


class LensFileNotFoundError(LensError, FileNotFoundError):
    """A file the package needs (a model, a lens, a checkpoint) is not there."""


class LensAttributeError(LensError, AttributeError):
    """A model lacks an attribute the package needs to read it."""


class LensFloatingPointError(LensError, FloatingPointError):
    """A computation produced a non-finite number (a training loss that diverged)."""


class UnknownArchitectureError(LensKeyError):
    """A model family the architecture table does not know; pass ``paths=``."""


class UnknownNormError(LensTypeError):
    """A final norm whose kind the decoder cannot read."""


class AttentionUnavailableError(LensRuntimeError):
    """The model's attention implementation does not materialise the attention probabilities."""


class RemoteLensError(LensRuntimeError):
    """A remote (NDIF) lens request failed: the message says whether the server, the network or the request."""


__all__ = [
    "LensError", "LensValueError", "LensTypeError", "LensKeyError", "LensIndexError", "LensRuntimeError",
    "LensNotImplementedError", "LensFileNotFoundError", "LensAttributeError", "LensFloatingPointError",
    "UnknownArchitectureError", "UnknownNormError", "AttentionUnavailableError", "RemoteLensError",
]
