"""Shape and dtype checks at the public boundary (jaxtyping annotations enforced by beartype).

Set ``LENS_PLUGINS_TYPECHECK=0`` to turn the checks off (they cost microseconds per call, but a
tight notebook loop may not want them). The remote-safe modules (``readout``) never use this:
nnsight rebuilds shipped functions without their decorators, and the server has no jaxtyping.
"""

import os
import sys


def _import_beartype():
    """``beartype`` at its first import hashes every callable in ``object.__dict__``; nnsight mounts an
    unhashable ``save`` method there (``nnsight._c.py_mount``), so ``import nnsight`` then ``import beartype``
    dies with "unhashable type: 'instancemethod'". Lift the mount for the import, then put it back."""
    mounted = object.__dict__.get("save")
    if "beartype" in sys.modules or mounted is None or type(mounted).__name__ != "instancemethod":
        from beartype import beartype
        return beartype
    from nnsight._c import mount, unmount

    unmount("save")
    try:
        from beartype import beartype
    finally:
        mount(mounted.__func__, "save")
    return beartype


beartype = _import_beartype()

from jaxtyping import jaxtyped  # noqa: E402  (after beartype: jaxtyping may import it)

ENABLED = os.environ.get("LENS_PLUGINS_TYPECHECK", "1") not in ("0", "false", "False")


def typechecked(obj):
    """Check a function's (or a dataclass's ``__init__``) jaxtyping annotations, unless disabled."""
    if not ENABLED:
        return obj
    return jaxtyped(typechecker=beartype)(obj)
