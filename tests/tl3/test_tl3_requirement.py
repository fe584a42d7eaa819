"""Runs in every venv: with transformer-lens 4.x, the HookedTransformer adapter must say what to install."""

import importlib
import importlib.util
import sys

import pytest

MODULE = "lens_plugins.models.hooked_transformer"


def has_hooked_transformer() -> bool:
    if importlib.util.find_spec("transformer_lens") is None:
        return False
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(has_hooked_transformer(), reason="this venv has HookedTransformer; the adapter imports")
def test_import_without_hooked_transformer_says_what_to_install():
    sys.modules.pop(MODULE, None)
    with pytest.raises(ImportError) as error:
        importlib.import_module(MODULE)
    message = str(error.value)
    assert "transformer-lens 3.9" in message
    assert "pip install transformer-lens==3.9.0" in message
    assert "separate venv" in message


@pytest.mark.skipif(not has_hooked_transformer(), reason="needs transformer-lens 3.9 (run in .venv-tl3)")
def test_import_with_hooked_transformer_works():
    module = importlib.import_module(MODULE)
    assert callable(module.hooked_transformer_from_hf)
