"""DoLa against transformers 4.x's own ``generate(dola_layers=...)``, token for token, on a tiny model.

transformers 5 moved DoLa to a hub-only custom generation method, so the reference is transformers 4.49 in a
throwaway venv (never the project's): ``DOLA_T4_PYTHON`` names its python, else one is built under
``/tmp/lens-plugins-dola-t4`` (torch 2.13.0 CPU from ``/opt/wheels`` when present, transformers 4.49.0).
That venv builds a tiny random Llama from its config class (fixed seed, norms perturbed so that skipping a
norm shows), saves it, and greedy-decodes with DoLa; this process loads the same weights with
transformers 5 and runs ``lp.transformer_lens.run_dola`` and ``lp.nnsight.run_dola``.

Run: ``python benchmarks/compare_dola_transformers4.py`` (about a minute plus the venv build). It prints,
per candidate setting, whether the tokens match with ``premature_norm=False`` (transformers 4's definition:
premature layers through ``lm_head`` without the final norm) and how many differ with our default
(``premature_norm=True``), and exits non-zero on a mismatch of the like-for-like comparison.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VENV = Path("/tmp/lens-plugins-dola-t4")
SETTINGS = [[0, 2], [1, 3], "low", "high"]
PROMPTS = [[5, 17, 300, 42, 7], [11, 12, 13], [900, 3, 77, 31, 8, 150]]
STEPS = 12

REFERENCE = r'''
import json, sys, torch, transformers
out_dir, settings, prompts, steps = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config).eval()
with torch.no_grad():
    for name, param in model.named_parameters():
        if "norm" in name:
            param.add_(torch.randn_like(param) * 0.5)
model.save_pretrained(out_dir)
results = {}
for setting in settings:
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                                   min_new_tokens=steps, dola_layers=setting, repetition_penalty=1.2,
                                   pad_token_id=0)
        results[f"{setting}|{i}"] = generated[0].tolist()
print(json.dumps({"version": transformers.__version__, "results": results}))
'''


def reference_python() -> str:
    if os.environ.get("DOLA_T4_PYTHON"):
        return os.environ["DOLA_T4_PYTHON"]
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        wheels = ["--find-links", "/opt/wheels"] if Path("/opt/wheels").is_dir() else []
        subprocess.run([str(python), "-m", "pip", "install", "-q", *wheels, "torch==2.13.0", "transformers==4.49.0"],
                       check=True)
    return str(python)


def main() -> int:
    import torch
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    import lens_plugins as lp
    from lens_plugins.models import default_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([reference_python(), "-c", REFERENCE, tmp, json.dumps(SETTINGS), json.dumps(PROMPTS),
                               str(STEPS)], check=True, capture_output=True, text=True)
        reference = json.loads(done.stdout.strip().splitlines()[-1])
        tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir())
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="eager").eval()
        nn_model = lp.nnsight.wrap_model(hf, tokenizer)
        bridge = TransformerBridge.boot_transformers(
            "tiny", hf_model=transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="eager").eval(),
            tokenizer=tokenizer).eval()
    print(f"reference: transformers {reference['version']} generate(dola_layers=..., repetition_penalty=1.2)")
    failures = 0
    for setting in SETTINGS:
        for i, prompt in enumerate(PROMPTS):
            expected = reference["results"][f"{setting}|{i}"]
            ids = torch.tensor([prompt])
            kwargs = dict(max_new_tokens=STEPS, layers=setting, repetition_penalty=1.2)
            like = lp.nnsight.run_dola(nn_model, ids, premature_norm=False, **kwargs).token_ids.tolist()
            like_tl = lp.transformer_lens.run_dola(bridge, ids, premature_norm=False, **kwargs).token_ids.tolist()
            ours = lp.nnsight.run_dola(nn_model, ids, **kwargs).token_ids.tolist()
            same = like == expected and like_tl == expected
            failures += not same
            differ = sum(a != b for a, b in zip(ours[len(prompt):], expected[len(prompt):]))
            print(f"layers={setting!s:8} prompt {i}: premature_norm=False {'matches' if same else 'DIFFERS'} "
                  f"({STEPS} tokens, nnsight and TransformerLens); default premature_norm=True differs at "
                  f"{differ}/{STEPS} tokens")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
