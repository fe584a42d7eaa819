"""Shape and dtype checks at the public boundary (jaxtyping annotations enforced by beartype).

Set ``LENS_PLUGINS_TYPECHECK=0`` to turn the checks off (they cost tens of microseconds per call, see
``benchmarks/bench_typecheck.py``; a tight notebook loop may not want them). The remote-safe modules
(``readout``) never use this: nnsight rebuilds shipped functions without their decorators, and the server
has no jaxtyping.

A failed check raises ``ArgumentTypeError`` (an ``lp.LensError`` and jaxtyping's ``TypeCheckError``) whose
first line says, in a user's terms, which argument is wrong, which axis or dtype, what was expected and
what came: e.g. ``logit_lens_from_stack(): argument 'token_ids' has seq=5 at dimension 1, but the arguments
before it fixed seq=3. Expected Int[Tensor, 'batch seq'], got a tensor of dtype int64 and shape (1, 5).``
jaxtyping's full report follows it.
"""

import collections.abc
import functools
import inspect
import os
import re
import sys
import types
import typing


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

from beartype.door import is_bearable  # noqa: E402
from jaxtyping import AbstractArray, TypeCheckError, jaxtyped  # noqa: E402  (after beartype: jaxtyping may import it)

from lens_plugins.core.errors import LensTypeError  # noqa: E402


class ArgumentTypeError(LensTypeError, TypeCheckError):
    """An argument of the wrong shape, dtype or type at the public boundary (a jaxtyping check failed)."""

ENABLED = os.environ.get("LENS_PLUGINS_TYPECHECK", "1") not in ("0", "false", "False")


def typechecked(obj):
    """Check a function's (or a dataclass's ``__init__``) jaxtyping annotations, unless disabled."""
    if not ENABLED:
        return obj
    if isinstance(obj, type):
        checked = jaxtyped(typechecker=beartype)(obj)
        checked.__init__ = _explained(checked.__init__, obj.__name__, inspect.signature(obj.__init__))
        return checked
    return _explained(jaxtyped(typechecker=beartype)(obj), obj.__name__ + "()", inspect.signature(obj))


def _explained(checked, name: str, signature: inspect.Signature):
    itemised = [p for p, parameter in signature.parameters.items() if _has_items(parameter.annotation)]

    @functools.wraps(checked)
    def wrapper(*args, **kwargs):
        if itemised:
            _check_every_item(name, signature, itemised, args, kwargs)
        try:
            return checked(*args, **kwargs)
        except ArgumentTypeError:
            raise
        except TypeCheckError as error:
            summary = _summary(str(error), name, signature, args, kwargs)
            raise ArgumentTypeError(str(error) if summary is None else f"{summary}\n\n{error}") from None

    return wrapper


_ITEMS = (list, collections.abc.Sequence)  # the containers whose items beartype samples (one, at random)
_UNIONS = (typing.Union, types.UnionType)


def _has_items(hint) -> bool:
    """Whether ``hint`` holds a ``list[...]`` or ``Sequence[...]``, whose items ``_fits`` checks one by one."""
    return typing.get_origin(hint) in _ITEMS or any(_has_items(arg) for arg in typing.get_args(hint))


def _fits(value, hint) -> bool:
    """``value`` fits ``hint`` with every item of a list or sequence checked, where beartype checks one item
    drawn at random: ``["a", model]`` would pass half the time and fail with another message the other half."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in _UNIONS:
        return any(_fits(value, arg) for arg in args)
    if origin in _ITEMS and len(args) == 1:
        return is_bearable(value, origin) and all(_fits(item, args[0]) for item in value)
    return is_bearable(value, hint)


def _check_every_item(name: str, signature: inspect.Signature, itemised: list, args, kwargs) -> None:
    """Refuse, the same way on every call, an argument with a container annotation that an item breaks."""
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return  # a missing or extra argument: beartype and Python name it
    for argument in itemised:
        if argument in bound and not _fits(bound[argument], signature.parameters[argument].annotation):
            expected = re.sub(r"<class '(.*?)'>", r"\1", str(signature.parameters[argument].annotation))
            raise ArgumentTypeError(f"{name}: argument {argument!r} has the wrong type. Expected {expected}, "
                                    f"got {_describe(bound[argument])}.")


def _summary(report: str, name: str, signature: inspect.Signature, args, kwargs) -> typing.Optional[str]:
    """The first line of a failed check: the argument, what is wrong with it, expected vs got."""
    parameter = re.search(r"typechecking parameter '(\w+)'", report)
    expected = re.search(r"Expected type: (.*)\.\n", report)
    if parameter is None or expected is None:
        return None
    argument = parameter.group(1)
    if argument not in signature.parameters:  # an inner checked call's, forwarded by **kwargs: already explained
        return None
    try:
        value = signature.bind_partial(*args, **kwargs).arguments.get(argument)
    except TypeError:
        return None
    bound = dict(re.findall(r"^(\w+)=(\d+)$", report.split("as follows.", 1)[-1], flags=re.MULTILINE))
    annotation = _array_annotation(signature.parameters[argument].annotation)
    problem = _problem(value, annotation, bound) if annotation is not None else "has the wrong type"
    expected_type = re.sub(r"<class '(.*)'>", r"\1", expected.group(1))
    return f"{name}: argument {argument!r} {problem}. Expected {expected_type}, got {_describe(value)}."


def _array_annotation(annotation):
    """The jaxtyping array type inside an annotation (``Optional[Float[...]]`` -> ``Float[...]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, AbstractArray):
        return annotation
    for inner in typing.get_args(annotation):
        found = _array_annotation(inner)
        if found is not None:
            return found
    return None


def _problem(value, annotation, bound: dict) -> str:
    shape = getattr(value, "shape", None)
    if shape is None:
        return "is not a tensor"
    dtype = str(getattr(value, "dtype", "?")).removeprefix("torch.")
    if dtype not in annotation.dtypes:
        return f"has dtype {dtype}, but it must be {annotation.dtype.__name__} (one of {', '.join(_torch_dtypes(annotation))})"
    dims = annotation.dims
    variadic = annotation.index_variadic
    if variadic is None and len(shape) != len(dims):
        return f"has {len(shape)} dimensions, but it must have {len(dims)} ({annotation.dim_str})"
    if variadic is not None and len(shape) < len(dims) - 1:
        return f"has {len(shape)} dimensions, but it must have at least {len(dims) - 1} ({annotation.dim_str})"
    if variadic is None:
        pairs = list(enumerate(zip(dims, shape)))
    else:
        tail = len(dims) - variadic - 1
        pairs = [(i, (dims[i], shape[i])) for i in range(variadic)]
        pairs += [(len(shape) - tail + j, (dims[variadic + 1 + j], shape[len(shape) - tail + j])) for j in range(tail)]
    for index, (dim, size) in pairs:
        dim_name = getattr(dim, "name", None)
        if dim_name in bound and int(bound[dim_name]) != size:
            return (f"has {dim_name}={size} at dimension {index}, but the arguments before it fixed "
                    f"{dim_name}={bound[dim_name]}")
        fixed = getattr(dim, "size", None)
        if isinstance(fixed, int) and fixed != size:
            return f"has size {size} at dimension {index}, but it must be {fixed}"
    return f"does not match {annotation.dim_str!r}"


def _torch_dtypes(annotation) -> list[str]:
    names = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
    return [n for n in names if n in annotation.dtypes]


def _describe(value) -> str:
    """What came, in a few words: a tensor by dtype and shape, a container by its items' types, a scalar by its
    (cut) repr, anything else (a model) by its type alone; never a large repr (a model's runs to pages)."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        dtype = str(getattr(value, "dtype", "?")).removeprefix("torch.")
        return f"a tensor of dtype {dtype} and shape {tuple(shape)}"
    kind = type(value).__name__
    if isinstance(value, (list, tuple, set, dict)):
        items = [type(item).__name__ for item in list(value)[:5]]
        more = ", ..." if len(value) > 5 else ""
        return f"a {kind} of {len(value)} items ({', '.join(items)}{more})"
    if value is None or isinstance(value, (str, int, float, bool)):
        text = repr(value)
        return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"
    return f"a {kind}"

__all__ = ["ENABLED", "typechecked", "ArgumentTypeError"]
