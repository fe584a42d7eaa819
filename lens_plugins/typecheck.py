"""Shape and dtype checks at the public boundary (jaxtyping annotations enforced by beartype).

Set ``LENS_PLUGINS_TYPECHECK=0`` to turn the checks off (they cost microseconds per call, but a
tight notebook loop may not want them). The remote-safe modules (``readout``) never use this:
nnsight rebuilds shipped functions without their decorators, and the server has no jaxtyping.
"""

import os

from beartype import beartype
from jaxtyping import jaxtyped

ENABLED = os.environ.get("LENS_PLUGINS_TYPECHECK", "1") not in ("0", "false", "False")


def typechecked(obj):
    """Check a function's (or a dataclass's ``__init__``) jaxtyping annotations, unless disabled."""
    if not ENABLED:
        return obj
    return jaxtyped(typechecker=beartype)(obj)
