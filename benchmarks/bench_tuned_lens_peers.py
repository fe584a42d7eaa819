"""Tuned-lens training: this package's ``TunedLens.train`` against the ``tuned-lens`` package's own trainer
(``python -m tuned_lens train``), same model, same text, same steps, same tokens per step.

Both train SmolLM2-135M-Instruct (float32, the local files; tuned-lens 0.2.0 needs transformers 4.x, which reads
a copy of the model whose ``config.json`` names ``rope_theta`` and the tokenizer class the 4.x way) on the first
``--train-texts`` texts of the built-in corpus cut into 128-token blocks, ``--steps`` optimiser steps of
``--batch`` blocks each (tuned-lens: ``--tokens_per_step batch*128 --per_gpu_batch_size batch``, so one forward
pass per step; here ``batch_size=batch``), KL loss (tuned-lens computes it under bfloat16 autocast, so this
package runs both its bfloat16 matmuls, the like-for-like figure, and its float32 default), SGD with Nesterov momentum 0.9, lr 1.0, weight decay 1e-3
and ``warmup_steps`` as tuned-lens chooses (``min(0.2 * steps, 1000)``). Each run is a fresh process; the
approaches alternate within a round; figures are medians. Time is the training loop alone (tuned-lens: from the
end of its ``setup``, which loads the model and tokenizes the data, to the end; here the ``train`` call after the
model is loaded and the text cut into token blocks), tokens/s = steps * batch * 128 / that time; memory is the rise of the process's peak resident
set over the training loop above its resident set before it (model, tokenizer and data loaded).
Both lenses are then scored by the same code (``lp.evaluate_lenses``) on the first ``--heldout-blocks``
128-token blocks of the corpus texts neither trained on: held-out KL(final || row) averaged over rows. Before
the measured part, both run the model once on 5 tokens (which pages its weights in and warms the kernels), so
that neither's memory figure counts the weights.

The reference runs in a throwaway venv (``/tmp/lens-plugins-tunedlens``, built on first use with pinned
versions: tuned-lens 0.2.0, transformers 4.49, datasets < 3.3, torchdata 0.7.1 without its torch pin, this
machine's CPU torch 2.13); never the project's.

    python benchmarks/bench_tuned_lens_peers.py [--steps 10] [--batch 8] [--rounds 1]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VENV = Path("/tmp/lens-plugins-tunedlens")
SEQ = 128
# tuned-lens's trainer runs the lens and its loss under bfloat16 autocast (its logit matmuls in bfloat16):
# lens_plugins_bf16 is the like-for-like run (matmul_dtype=torch.bfloat16), lens_plugins the float32 default.
APPROACHES = ("tuned_lens_package", "lens_plugins_bf16", "lens_plugins")

# Runs tuned-lens's own CLI in this process, timing from the end of its setup; prints the figures as JSON.
REFERENCE = r'''
import json, runpy, sys, time
import tuned_lens.scripts.train_loop as loop
marks = {}
setup = loop.Train.setup
def rss(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
def timed_setup(self):
    out = setup(self)
    import torch
    with torch.no_grad():  # one forward first: pages the weights in and warms the kernels, as for ours
        out[1](torch.tensor([[1, 2, 3, 4, 5]]))
    marks["base"] = rss("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # the peak from here on: the training loop's own
    marks["start"] = time.perf_counter()
    return out
loop.Train.setup = timed_setup
sys.argv = ["tuned_lens"] + json.loads(sys.argv[1])
try:
    runpy.run_module("tuned_lens", run_name="__main__")
except SystemExit:
    pass
seconds = time.perf_counter() - marks["start"]
import torch
print(json.dumps({"seconds": seconds, "peak_mb": (rss("VmHWM") - marks["base"]) / 1024,
                  "threads": torch.get_num_threads()}))
'''


def reference_python() -> str:
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        constraints = VENV / "constraints.txt"
        constraints.write_text("torch==2.13.0\n")
        wheels = ["--find-links", "/opt/wheels"] if Path("/opt/wheels").is_dir() else []
        pip = [str(python), "-m", "pip", "install", "-q", *wheels, "-c", str(constraints)]
        subprocess.run(pip + ["torch==2.13.0", "tuned-lens==0.2.0", "transformers==4.49.0", "datasets<3.3"], check=True)
        subprocess.run(pip + ["--no-deps", "torchdata==0.7.1"], check=True)  # tuned-lens needs its dataloader2
    return str(python)


def t4_model_dir(tmp: str) -> str:
    """A copy of the default model that transformers 4.49 reads as the same model."""
    from lens_plugins.models import default_model_dir

    target = Path(tmp) / "smollm2-t4"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for path in default_model_dir().iterdir():
        shutil.copy(path, target / path.name)
    config = json.loads((target / "config.json").read_text())
    if "rope_parameters" in config:
        config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    (target / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((target / "tokenizer_config.json").read_text())
    tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return str(target)


def rss(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def ours(approach: str, texts_file: str, steps: int, batch: int, out: str) -> dict:
    """This package's trainer, timed and measured like the reference: the model is loaded and the text tokenized
    into blocks first (tuned-lens's ``setup``), then the peak resident set is reset and the training loop runs."""
    import torch

    import lens_plugins as lp
    from lens_plugins.models import default_model_dir, load_hf_model
    from lens_plugins.training.tuned_lens import token_blocks_of

    model, tokenizer = load_hf_model(default_model_dir())
    texts = [json.loads(line)["text"] for line in open(texts_file)]
    wrapped = lp.nnsight.wrap_model(model, tokenizer)  # carries the tokenizer; training runs the HF model
    blocks = token_blocks_of(wrapped, texts, SEQ)
    with torch.no_grad():  # one forward first: pages the weights in and warms the kernels, as for the reference
        model(torch.tensor([[1, 2, 3, 4, 5]]))
    matmul_dtype = torch.bfloat16 if approach == "lens_plugins_bf16" else torch.float32
    base = rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: the training loop's own
    start = time.perf_counter()
    lens = lp.TunedLens.train(wrapped, blocks, steps=steps, seq_len=SEQ, batch_size=batch,
                              warmup_steps=min(int(0.2 * steps), 1000), heldout=0.01, progress=False,
                              matmul_dtype=matmul_dtype)
    seconds = time.perf_counter() - start
    peak = rss("VmHWM")
    lens.save(out)
    return {"seconds": seconds, "peak_mb": (peak - base) / 1024, "threads": torch.get_num_threads()}


def heldout_kl(lens_dirs: dict, texts: list, n_blocks: int) -> dict:
    import lens_plugins as lp
    from lens_plugins.models import default_model_dir, load_hf_model
    from lens_plugins.training.tuned_lens import token_blocks_of

    model, tokenizer = load_hf_model(default_model_dir())
    wrapped = lp.nnsight.wrap_model(model, tokenizer)
    blocks = token_blocks_of(wrapped, texts, SEQ)[:n_blocks]  # the first n_blocks of text neither trained on
    lenses = [lp.TunedLens.load(path) for path in lens_dirs.values()]
    result = lp.evaluate_lenses(wrapped, blocks, [lp.LogitLens(), *lenses], names=["logit lens", *lens_dirs])
    frame = result.to_dataframe()
    return {name: float(frame[(frame["lens"] == name) & (frame["row"] != frame["row"].iloc[-1])]["kl"].mean())
            for name in ["logit lens", *lens_dirs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--train-texts", type=int, default=64)
    parser.add_argument("--heldout-blocks", type=int, default=16,
                        help="128-token blocks of the held-out texts the KL is measured on")
    parser.add_argument("--keep", help="a folder to keep the trained lenses in (default: a temporary one)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--texts", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(ours(args.child, args.texts, args.steps, args.batch, args.out)))
        return

    from cpu import cpu_description

    from lens_plugins.training.loop import builtin_corpus

    corpus = builtin_corpus()
    train, held = corpus[:args.train_texts], corpus[args.train_texts:]
    print(f"# Tuned-lens training, SmolLM2-135M-Instruct float32, {args.steps} steps x {args.batch} blocks x {SEQ} "
          f"tokens, KL loss; {len(train)} training texts, {len(held)} held-out; {cpu_description()}", flush=True)
    results = {a: [] for a in APPROACHES}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.keep or tmp
        texts_file = os.path.join(tmp, "train.jsonl")
        with open(texts_file, "w") as f:
            for text in train:
                f.write(json.dumps({"text": text}) + "\n")
        model_dir = t4_model_dir(tmp)
        python = reference_python()
        for round_ in range(args.rounds):
            order = APPROACHES if round_ % 2 == 0 else APPROACHES[::-1]
            for approach in order:
                out = os.path.join(tmp, f"{approach}-{round_}")
                if approach == "tuned_lens_package":
                    cli = ["train", "--model.name", model_dir, "--data.name", texts_file, "--max_length", str(SEQ),
                           "--num_steps", str(args.steps), "--tokens_per_step", str(args.batch * SEQ),
                           "--per_gpu_batch_size", str(args.batch), "--precision", "float32", "--loss", "KL",
                           "-o", out]
                    command = [python, "-c", REFERENCE, json.dumps(cli)]
                else:
                    command = [sys.executable, __file__, "--child", approach, "--texts", texts_file, "--out", out,
                               "--steps", str(args.steps), "--batch", str(args.batch)]
                load = os.getloadavg()[0]
                env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
                done = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
                if done.returncode:
                    raise SystemExit(f"{approach} failed:\n{done.stderr[-3000:]}")
                record = json.loads(done.stdout.strip().splitlines()[-1]) | {"load": load, "lens": out}
                record["tokens_per_s"] = args.steps * args.batch * SEQ / record["seconds"]
                results[approach].append(record)
                print(f"round {round_ + 1} {approach}: {json.dumps(record)}", flush=True)
        kl = heldout_kl({a: results[a][-1]["lens"] for a in APPROACHES}, held, args.heldout_blocks)
    base = results["tuned_lens_package"]
    base_rate = statistics.median(r["tokens_per_s"] for r in base)
    base_peak = statistics.median(r["peak_mb"] for r in base)
    print("\n| approach | tokens/s (median) | x tuned-lens | peak memory of the loop (MB) | / tuned-lens | held-out KL, mean over "
          "rows (nats) |")
    print("|---|---|---|---|---|---|")
    for approach in APPROACHES:
        rate = statistics.median(r["tokens_per_s"] for r in results[approach])
        peak = statistics.median(r["peak_mb"] for r in results[approach])
        print(f"| {approach} | {rate:.1f} | {rate / base_rate:.2f}x | {peak:.0f} | {peak / base_peak:.2f} | "
              f"{kl[approach]:.3f} |")
    print(f"| logit lens (no training) | - | - | - | - | {kl['logit lens']:.3f} |")
    print(f"\nload average during the runs: {[round(r['load'], 1) for rs in results.values() for r in rs]}; "
          f"threads: {base[0]['threads']}")


if __name__ == "__main__":
    main()
