"""What an NDIF server does with a lens request, without a server: serialise the trace with nnsight's own
request model, then deserialise and run it in a fresh process where lens_plugins, jaxtyping, beartype,
plotly and pandas cannot be imported (the server has none of them), and compare with the local run.

``remote="local"`` alone would not catch a shipped helper that imports jaxtyping at run time: it hides
our modules only while deserialising, in a process where site-packages still imports them.
"""

import subprocess
import sys
import textwrap

import torch
from nnsight.schema.request import RequestModel
from nnsight.tracing.backend import Backend

from lens_plugins.backends import nnsight as lpn
from lens_plugins.backends.nnsight import logit_lens  # the body must name a function, not our package
from lens_plugins.models import default_model_dir
from tiny_models import tiny_model

SERVER = textwrap.dedent("""
    import sys

    BLOCKED = {"lens_plugins", "jaxtyping", "beartype", "plotly", "pandas"}

    class Blocker:
        # Makes the blocked packages absent: `import` raises ModuleNotFoundError and
        # importlib.util.find_spec (which torch probes with) answers None.

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                sys.modules[name] = None  # the import system's "known to be missing"
            return None

    sys.meta_path.insert(0, Blocker())

    import torch
    from nnsight.modeling.transformers import TransformersModel
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.tracer import dec, inc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, tokenizer_dir, request, out = sys.argv[1:]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    model = TransformersModel(hf, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir), task="text-generation")
    with open(request, "rb") as f:
        tracer = RequestModel.deserialize(f.read(), model._remoteable_persistent_objects())
    inc()  # run it as the outermost trace, as the server's worker does: only saved values come back
    try:
        tracer.execute(tracer.info.code)
        saved = tracer.info.frame.f_locals
    finally:
        dec()
    imported = [n for n, m in sys.modules.items() if m is not None and n.split(".")[0] in BLOCKED]
    assert not imported, f"imported on the server: {imported}"
    torch.save(saved["lens"], out)  # plain pickle: no class of ours may be in it
""")


class SerializeThenRunLocally(Backend):
    """Keep the request blob the remote backend would send, then run the trace here as usual."""

    def __call__(self, tracer):
        self.blob = RequestModel.serialize(tracer)
        tracer.execute(tracer.info.code)


def run_on_server(tmp_path, hf, blob, saved_name="lens"):
    """Run a serialised request the way a server does (``SERVER``), on ``hf``'s weights; return what the
    trace saved as ``saved_name``."""
    hf.save_pretrained(tmp_path / "model")
    (tmp_path / "request").write_bytes(blob)
    server = SERVER.replace('saved["lens"]', f"saved[{saved_name!r}]")
    subprocess.run(
        [sys.executable, "-c", server, str(tmp_path / "model"), str(default_model_dir()), str(tmp_path / "request"),
         str(tmp_path / "out.pt")],
        check=True, timeout=240,
    )
    return torch.load(tmp_path / "out.pt", weights_only=False)


def assert_same_stats(served, local):
    assert served.keys() == local.keys()
    for name, value in local["stats"].items():
        torch.testing.assert_close(served["stats"][name], value, rtol=0, atol=0, equal_nan=True, msg=name)


def test_request_runs_where_lens_plugins_cannot_be_imported(tmp_path, smollm2_tokenizer):
    hf = tiny_model("gemma2")  # the most quirks: (1 + w) norm, embedding scale, soft-cap
    model = lpn.wrap_model(hf, smollm2_tokenizer)
    backend = SerializeThenRunLocally()
    with model.trace("in it is the", backend=backend):
        lens = logit_lens(model, top_k=5, targets=[" the", 17], positions=[0, -1])
    # The request is code (about 100 kB of shipped source) and a few ids: the embedding (W_U, tied) is 256 kB.
    embedding = hf.get_input_embeddings().weight
    assert len(backend.blob) < embedding.numel() * embedding.element_size(), "the request must not carry weights"
    served = run_on_server(tmp_path, hf, backend.blob)
    assert_same_stats(served, lens)
    assert lpn.logit_lens_result(served, model).top_ids.shape == (4, 1, 2, 5)


def test_the_package_name_itself_ships_to_a_server(tmp_path, smollm2_tokenizer):
    """``lp.nnsight.logit_lens(model)`` in a remote body: ``lp`` pickles as its server-side namespace."""
    import lens_plugins as lp

    hf = tiny_model("llama")
    model = lpn.wrap_model(hf, smollm2_tokenizer)
    backend = SerializeThenRunLocally()
    with model.trace("in it is the", backend=backend):
        lens = lp.nnsight.logit_lens(model, top_k=3, targets=[" the"])
    served = run_on_server(tmp_path, hf, backend.blob)
    assert_same_stats(served, lens)
    assert lp.nnsight.logit_lens_result(served, model).rank_of(" the").shape == (4, 1, 4)


def test_remote_local_simulation_matches_local(smollm2_tokenizer):
    model = lpn.wrap_model(tiny_model("opt"), smollm2_tokenizer)
    with model.trace("in it is the"):
        local = logit_lens(model, top_k=5, targets=[" the"])
    with model.trace("in it is the", remote="local"):
        simulated = logit_lens(model, top_k=5, targets=[" the"])
    for name, value in local["stats"].items():
        torch.testing.assert_close(simulated["stats"][name], value, rtol=0, atol=0, equal_nan=True, msg=name)


def test_an_affine_lens_ships_to_the_server_as_tensors(tmp_path, smollm2_tokenizer):
    """A lens object cannot cross to a server; its affine tensors can, and the server applies them with the
    shipped ``core.lenses.apply_affine``: the same numbers as the local trace."""
    import lens_plugins as lp

    hf = tiny_model("llama")
    model = lpn.wrap_model(hf, smollm2_tokenizer)
    generator = torch.Generator().manual_seed(0)
    tuned = lp.AffineLens(["embed", "1_pre", "2_pre", "2_post"], torch.randn(4, 64, 64, generator=generator) * 0.05,
                          torch.randn(4, 64, generator=generator) * 0.1)
    shipped = lpn.lens_tensors(model, tuned)
    backend = SerializeThenRunLocally()
    with model.trace("in it is the", backend=backend):
        lens = logit_lens(model, top_k=3, lens=shipped)
    served = run_on_server(tmp_path, hf, backend.blob)
    assert_same_stats(served, lens)
    with model.trace("in it is the"):
        plain = logit_lens(model, top_k=3)
    assert not torch.equal(plain["stats"]["top_logprobs"], lens["stats"]["top_logprobs"])


def test_generation_lens_and_dola_run_where_lens_plugins_cannot_be_imported(tmp_path, smollm2_tokenizer):
    """The generation verbs through ``lp`` in a serialised ``model.generate`` body (``core.generation``,
    ``core.dola_trace`` and the modules they name reach the server by value): the same numbers as here."""
    import lens_plugins as lp

    hf = tiny_model("llama")
    model = lpn.wrap_model(hf, smollm2_tokenizer)
    prompt = torch.tensor([[5, 17, 300, 42, 7]])
    for verb in ("generation_lens", "dola"):
        backend = SerializeThenRunLocally()
        with model.generate(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False, backend=backend) as tracer:
            if verb == "generation_lens":
                lens = lp.nnsight.generation_lens(model, tracer, 3, top_k=3, targets=[17])
            else:
                lens = lp.nnsight.dola(model, tracer, 3, layers=[0, 1, 2])
        served = run_on_server(tmp_path / verb, hf, backend.blob)
        assert served.keys() == lens.keys() and len(served["steps"]) == len(lens["steps"]) == 3
        for ours, theirs in zip(served["steps"], lens["steps"]):
            for name, value in theirs.items():
                torch.testing.assert_close(ours[name], value, rtol=0, atol=0, equal_nan=True, msg=name)
