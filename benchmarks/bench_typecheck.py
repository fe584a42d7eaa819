"""What the jaxtyping + beartype boundary checks cost: the same calls with ``LENS_PLUGINS_TYPECHECK`` on
and off, each setting in its own process (the switch is read at import).

Times a small ``logit_lens_from_stack`` (4 rows x 8 tokens x 1,000-token vocabulary, where a fixed
per-call overhead shows most) and building a ``Decoder`` and a ``LensResult`` (the checked dataclasses).
A real lens (SmolLM2, 31 rows x 256 tokens, ``bench_logit_lens.py``) takes seconds; the checks add the
same microseconds to it.

    python benchmarks/bench_typecheck.py [--repeats 200]
"""

import argparse
import json
import os
import subprocess
import sys

PROBE = r"""
import dataclasses, json, sys, time
import torch
from lens_plugins.decoder import Decoder
from lens_plugins.methods.lens import logit_lens_from_stack

torch.manual_seed(0)
repeats = int(sys.argv[1])
W_U = torch.randn(64, 1000)
decoder = Decoder("rmsnorm", W_U, norm_weight=torch.ones(64))
stack = torch.randn(4, 1, 8, 64)
tokens = torch.randint(0, 1000, (1, 8))
labels = ["embed", "1_pre", "2_pre", "2_post"]


class Tokenizer:  # the lens only decodes ids for labels
    @staticmethod
    def decode(ids):
        return f"<{ids[0]}>"



def best(call):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times) * 1e6


result = logit_lens_from_stack(stack, labels, decoder, tokens, Tokenizer, top_k=3)
print(json.dumps({
    "logit_lens_from_stack_us": best(lambda: logit_lens_from_stack(stack, labels, decoder, tokens, Tokenizer, top_k=3)),
    "Decoder_us": best(lambda: Decoder("rmsnorm", W_U, norm_weight=torch.ones(64))),
    "LensResult_us": best(lambda: dataclasses.replace(result)),
}))
"""


def measure(enabled: bool, repeats: int) -> dict:
    env = {**os.environ, "LENS_PLUGINS_TYPECHECK": "1" if enabled else "0"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(repeats)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    on, off = measure(True, args.repeats), measure(False, args.repeats)
    print(f"{'call':<24}{'checks on':>12}{'checks off':>12}{'overhead':>12}")
    for name in on:
        print(f"{name.removesuffix('_us'):<24}{on[name]:>10.0f}us{off[name]:>10.0f}us{on[name] - off[name]:>10.0f}us")


if __name__ == "__main__":
    main()
