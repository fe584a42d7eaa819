"""Tests that need TransformerLens 3.9's ``HookedTransformer``; they run in ``.venv-tl3``.

In an environment without ``HookedTransformer`` (the main venv has transformer-lens 4.x) every module
here is reported as skipped with the reason, except ``test_tl3_requirement.py``, which checks the
error message a 4.x user gets. CI runs this directory in ``.venv-tl3`` with
``LENS_PLUGINS_REQUIRE_TL3=1``, which turns the skip into a failure, so a broken ``.venv-tl3`` cannot
pass as "skipped".
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RUNS_EVERYWHERE = {"test_tl3_requirement.py"}

# export_lens.py sits next to the tests; make it importable whatever sys.path pytest built.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def hooked_transformer_problem():
    """Why ``transformer_lens.HookedTransformer`` is unusable here, or ``None`` if it is usable."""
    if importlib.util.find_spec("transformer_lens") is None:
        return "transformer-lens is not installed"
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError as error:
        return f"transformer_lens has no HookedTransformer ({str(error).splitlines()[0]})"
    return None


PROBLEM = hooked_transformer_problem()
SKIP_REASON = (
    f"needs transformer-lens 3.9 (HookedTransformer): {PROBLEM}. These tests run in .venv-tl3: "
    "make test-tl3 (or LENS_PLUGINS_REQUIRE_TL3=1 .venv-tl3/bin/python -m pytest -q tests/tl3)"
)

if PROBLEM is not None and os.environ.get("LENS_PLUGINS_REQUIRE_TL3"):
    raise pytest.UsageError(f"LENS_PLUGINS_REQUIRE_TL3 is set but {SKIP_REASON}")


class _SkippedModule(pytest.Module):
    def collect(self):
        pytest.skip(SKIP_REASON, allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    if PROBLEM is not None and module_path.parent == HERE and module_path.name not in RUNS_EVERYWHERE:
        return _SkippedModule.from_parent(parent, path=module_path)
    return None


@pytest.fixture(scope="session")
def smollm2_ht():
    """SmolLM2 as ``load_default_model(backend="hooked_transformer")`` gives it: from_pretrained's
    defaults (fold_ln, center_writing_weights, center_unembed, fold_value_biases)."""
    import warnings

    from lens_plugins.models import load_default_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return load_default_model(backend="hooked_transformer")


@pytest.fixture(scope="session")
def smollm2_ht_unprocessed(smollm2_hf):
    """SmolLM2 with no weight processing at all (as from_pretrained_no_processing)."""
    import warnings

    from lens_plugins.models.hooked_transformer import hooked_transformer_from_hf

    model, tokenizer = smollm2_hf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return hooked_transformer_from_hf(model, tokenizer, fold_ln=False, center_writing_weights=False,
                                          center_unembed=False, fold_value_biases=False)


@pytest.fixture(scope="session", params=["fold_ln", "unprocessed"])
def smollm2_hooked(request):
    """Both SmolLM2 HookedTransformers, as ``(name, model)``."""
    name = request.param
    return name, request.getfixturevalue("smollm2_ht" if name == "fold_ln" else "smollm2_ht_unprocessed")
