"""DoLa's compatibility mode (``premature_norm=False``) against transformers 4.x's own
``generate(dola_layers=...)`` on the real SmolLM2-135M, token for token, on both backends.

transformers 5 dropped DoLa from ``generate``, so the reference is transformers 4.49 in a throwaway venv under
the temp dir (never the project's; built once by ``benchmarks/compare_dola_transformers4.reference_python``,
or named by ``DOLA_T4_PYTHON``). A tiny random model hid the criterion bug this guards against: with raw
residuals every candidate's true JS divergence sits at ln 2 within 1e-7, so a JS argmax is a float tie-break,
while transformers' criterion (a vocabulary mean of KL(m || p) terms) does not saturate. transformers 4 reads
SmolLM2's rope theta only from a 4.x-style config (top-level ``rope_theta``), so the reference loads a copy of
the model directory whose ``config.json`` says it that way.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lens_plugins as lp
from lens_plugins.models import default_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from compare_dola_transformers4 import reference_python  # noqa: E402

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "def fibonacci(n):"]
SETTINGS = ["high", "low", [4, 12, 20]]
STEPS = 10
PENALTY = 1.2

REFERENCE = r'''
import json, sys, torch, transformers
model_dir, prompts, settings, steps, penalty = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), \
    int(sys.argv[4]), float(sys.argv[5])
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
results = {}
for setting in settings:
    for i, ids in enumerate(prompts):
        ids = torch.tensor([ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                             dola_layers=setting, repetition_penalty=penalty, pad_token_id=2)
        results[f"{setting}|{i}"] = out[0].tolist()
print(json.dumps({"version": transformers.__version__, "results": results}))
'''

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory, smollm2_tokenizer):
    """transformers 4.49's DoLa tokens for every (setting, prompt), from a 4.x-style copy of the model."""
    model_dir = tmp_path_factory.mktemp("smollm2-t4")
    for path in default_model_dir().iterdir():
        shutil.copy(path, model_dir / path.name)
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    (model_dir / "config.json").write_text(json.dumps(config))
    prompts = [smollm2_tokenizer(p)["input_ids"] for p in PROMPTS]
    done = subprocess.run([reference_python(), "-c", REFERENCE, str(model_dir), json.dumps(prompts),
                           json.dumps(SETTINGS), str(STEPS), str(PENALTY)],
                          check=True, capture_output=True, text=True, timeout=1200)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["version"].startswith("4.")
    return prompts, out["results"]


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_premature_norm_false_is_transformers_4_token_for_token(reference, setting, smollm2_hf, smollm2_bridge):
    prompts, results = reference
    hf, tokenizer = smollm2_hf
    model = lp.nnsight.wrap_model(hf, tokenizer)
    kwargs = dict(max_new_tokens=STEPS, layers=setting, repetition_penalty=PENALTY, premature_norm=False)
    for i, ids in enumerate(prompts):
        expected = results[f"{setting}|{i}"]
        ids = torch.tensor([ids])
        assert lp.nnsight.run_dola(model, ids, **kwargs).token_ids.tolist() == expected, (setting, i, "nnsight")
        assert lp.transformer_lens.run_dola(smollm2_bridge, ids, **kwargs).token_ids.tolist() == expected, \
            (setting, i, "TransformerLens")
