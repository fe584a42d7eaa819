"""A family checked against the model's own numbers before any lens runs on it, once per model class.

``resolve`` is what every lens entry point calls: the spec of ``architectures.resolve`` (a table entry, paths
by hand, or ``discovery.discover``), then, on first use of the model class, ``verify``: one forward pass of
a few tokens with hooks on every block and every block's children, which checks

- every residual row the reader produces (block ``i``'s input, the last block's output) equals
  ``output_hidden_states[i]`` (the last one before or after the final norm, as families differ);
- the last row decoded by the decoder (``architectures.decoder_tensors``) equals the model's own logits;
- the sublayer writes add up: block input + attention write + MLP write = block output, in every block;
- the heads add up: the per-head writes through the output projection (and a sandwich norm frozen at its
  real scale) sum to the attention write, as direct logit attribution splits them.

The first two are the lens itself: a family that fails them is refused (``UnknownArchitectureError`` naming the
row and the size of the mismatch). The other two only refuse sublayer rows or attribution, with the reason
(``sublayers_refused`` / ``heads_refused`` in the spec, read by ``dla.check_sublayer_writes``).

For a discovered spec, the same forward settles what the module tree cannot say, by fitting the recorded
numbers: the final norm's kind and ``w`` / ``1 + w`` convention, a logit multiplier the forward applies (a
config field equal to the fitted scale, e.g. Cohere's ``logit_scale``), which two children's outputs are what
enters the stream (a sandwich norm's, as in Gemma 2), and whether attention and MLP read the same input
(parallel blocks). A table entry is checked, never changed.

Verdicts are kept per (model class, spec) in ``VERDICTS``; a model whose weights are not here (``meta``
tensors of a remote-only model) is verified where it runs. Torch only: this ships to NDIF servers.
"""

import torch

from lens_plugins.core import architectures, discovery, dla
from lens_plugins.core.errors import LensError, UnknownArchitectureError
from lens_plugins.core.readout import apply_final_norm

VERDICTS = {}
TOKENS = 5
# Relative tolerance (of the largest magnitude compared) per parameter dtype: the hooks read the very tensors
# the model adds, so float32 agrees to rounding; half precision rounds each sum.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
HALF_TOLERANCE = 3e-2
EPS_FIELDS = ("variance_epsilon", "eps", "epsilon", "variance_eps", "layer_norm_eps")
CONFIG_EPS_FIELDS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon")


def resolve(model, paths=None):
    """The verified spec of ``model`` (an HF causal LM or an nnsight envoy around one): the lens entry points'
    one call. Raises ``UnknownArchitectureError`` naming what did not match for a family that fails."""
    spec = architectures.resolve(model, paths)
    hf = getattr(model, "_module", model)
    if not isinstance(hf, torch.nn.Module) or not weights_here(hf):
        return spec
    key = (type(hf), spec_key(spec))
    if key not in VERDICTS:
        # Inside an nnsight trace the probe must not reach the trace's interventions: its interleaver is
        # paused for the one forward (module calls then run as plain PyTorch), and resumed as it was.
        interleaver = getattr(model, "interleaver", None) if model is not hf else None
        was = getattr(interleaver, "interleaving", False)
        if was:
            interleaver.interleaving = False
        try:
            VERDICTS[key] = verify(hf, spec)
        finally:
            if was:
                interleaver.interleaving = True
    verdict = VERDICTS[key]
    if verdict["refused"]:
        raise UnknownArchitectureError(verdict["refused"])
    return dict(verdict["spec"], **{k: v for k, v in spec.items() if k not in verdict["spec"]})


def spec_key(spec):
    """A hashable form of a spec (its values are strings, tuples, booleans and numbers)."""
    return tuple(sorted((k, v if not isinstance(v, list) else tuple(v)) for k, v in spec.items()))


def weights_here(hf):
    """Whether the model's weights are real tensors here (not ``meta``: a remote-only model)."""
    first = next(hf.parameters(), None)
    return first is not None and first.device.type != "meta"


def tolerance(hf):
    dtype = next(hf.parameters()).dtype
    return TOLERANCE.get(dtype, HALF_TOLERANCE)


def mismatch(ours, theirs):
    """Largest absolute difference relative to the largest magnitude of ``theirs`` (``inf``: shapes differ)."""
    if ours is None or theirs is None or ours.numel() != theirs.numel():
        return float("inf")
    ours, theirs = ours.detach().float().reshape(theirs.shape), theirs.detach().float()
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-6))


def by(error, ours, theirs):
    """How two tensors differ, for a refusal: relatively, or in shape."""
    if error != float("inf"):
        return f"by {error:.2e} (relative)"
    shape = lambda t: None if t is None else tuple(t.shape)  # noqa: E731
    return f"in shape ({shape(ours)} against {shape(theirs)}: the residual is not one [batch, seq, d_model] stream)"


def verify(hf, spec):
    """``{"spec": completed spec, "refused": None or the reason}`` from one short forward of ``hf``."""
    name = f"{type(hf).__name__} (model_type {architectures.model_type(hf)!r})"
    spec = dict(spec)
    tol = None
    try:
        record = run(hf, spec)
        tol = tolerance(hf)
        problem = check_rows(record, tol)
        if problem is None:
            problem = check_logits(hf, spec, record, tol)
    except LensError as error:
        return {"spec": spec, "refused": f"{name}: {error}"}
    except Exception as error:  # the family's forward (or its outputs) did not fit the probe
        return {"spec": spec, "refused": f"{name}: the verification forward failed ({type(error).__name__}: "
                                         f"{str(error)[:300]})"}
    if problem is not None:
        return {"spec": spec, "refused": f"{name} cannot be lensed as it is: {problem}. Pass the module paths by "
                                         "hand (paths={'layers': ..., 'final_norm': ..., 'lm_head': ...}) if "
                                         "they were found wrongly, or build the decoder with lp.Decoder"}
    if not spec.get("adds_residual"):
        try:
            check_sublayers(hf, spec, record, tol)
            check_heads(hf, spec, record, tol)
        except Exception as error:  # a block whose children do not fit the probe: the rows alone are verified
            spec.setdefault("sublayers_refused", f"the sublayer check failed ({type(error).__name__}: {error})")
    return {"spec": spec, "refused": None}


def eval_for_probe(module):
    """Put every submodule of ``module`` in eval mode for a probe (the probe is the model's prediction: no
    dropout, whatever mode the model is in) and return the set of those that were training, for
    ``restore_modes``. A model already in eval mode throughout, the usual case, is not touched: ``train()``
    walks every submodule with a ``setattr`` each (30-37 ms on a TransformerBridge of SmolLM2, 2,002 modules,
    where reading the flags takes 4 ms)."""
    training = {m for m in module.modules() if m.training}
    if training:
        module.eval()
    return training


def restore_modes(module, training):
    """Each submodule's own training flag back after ``eval_for_probe``: ``train(was)`` would flatten a mixed
    state (a model in eval mode with one submodule left training) into one flag."""
    if training:
        module.train(module in training)  # the model's own ``train`` (a wrapper may keep state in step)
        for m in module.modules():
            m.training = m in training


def run(hf, spec):
    """One forward of ``TOKENS`` tokens with hooks: every block's input and output, every child's input and
    output (in the order they ran), the final norm's output, and the model's hidden states and logits."""
    blocks = architectures.get_path(hf, spec["layers"])
    norm = architectures.get_path(hf, spec["final_norm"]) if spec.get("final_norm") else None
    vocab = architectures.get_path(hf, spec["lm_head"]).weight.shape[0]
    record = {"in": {}, "out": {}, "children": [{} for _ in blocks], "child_in": [{} for _ in blocks],
              "proj_in": {}, "norm_out": None, "norm_in": None}
    handles = []

    # Every tensor is cloned as it is recorded: a family may add into a module's output in place afterwards
    # (Falcon's ``mlp_output += attention_output``).
    def keep(store, key):
        def hook(module, args, kwargs):
            store[key] = architectures.layer_input((args, kwargs)).clone()
        return hook

    def keep_output(layer, child):
        def hook(module, args, output):
            value = architectures.layer_output(output)
            if isinstance(value, torch.Tensor):
                record["children"][layer].pop(child, None)  # re-insert: dict order is the order they ran
                record["children"][layer][child] = value.clone()
        return hook

    def keep_child_input(layer, child):
        def hook(module, args, kwargs):
            value = args[0] if args else kwargs.get("hidden_states")
            if isinstance(value, torch.Tensor):
                record["child_in"][layer][child] = value.clone()
        return hook

    def keep_projection_input(layer):
        def hook(module, args, kwargs):
            record["proj_in"][layer] = (args[0] if args else next(iter(kwargs.values()))).clone()
        return hook

    try:
        for layer, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(keep(record["in"], layer), with_kwargs=True))
            handles.append(block.register_forward_hook(
                lambda m, a, o, layer=layer: record["out"].__setitem__(layer, architectures.layer_output(o).clone())))
            for child_name, child in block.named_children():
                handles.append(child.register_forward_hook(keep_output(layer, child_name)))
                handles.append(child.register_forward_pre_hook(keep_child_input(layer, child_name), with_kwargs=True))
            for path in projection_paths(spec):
                proj = architectures.get_path(block, path, optional=True)
                if proj is not None:
                    handles.append(proj.register_forward_pre_hook(keep_projection_input(layer), with_kwargs=True))
                    break
        if norm is not None:
            handles.append(norm.register_forward_hook(
                lambda m, a, o: record.__setitem__("norm_out", architectures.layer_output(o).clone())))
            handles.append(norm.register_forward_pre_hook(
                lambda m, a, k: record.__setitem__("norm_in", architectures.layer_input((a, k)).clone()), with_kwargs=True))
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(min(3, vocab - 1), vocab, (1, TOKENS), generator=generator)
        device = next(hf.parameters()).device
        training = eval_for_probe(hf)
        try:
            with torch.no_grad():
                output = hf(input_ids=ids.to(device), output_hidden_states=True, use_cache=False)
        finally:
            restore_modes(hf, training)
    finally:
        for handle in handles:
            handle.remove()
    record["n"] = len(blocks)
    record["hidden_states"] = getattr(output, "hidden_states", None)
    record["logits"] = getattr(output, "logits", None)
    return record


def projection_paths(spec):
    path = spec.get("o_proj")
    return () if path is None else path if isinstance(path, tuple) else (path,)


def check_rows(record, tol):
    """The residual rows against ``output_hidden_states`` (or, without them, each block's output against the
    next block's input): ``None`` or what did not match."""
    n = record["n"]
    ran = [layer for layer in range(n) if layer not in record["in"] or layer not in record["out"]]
    if ran:
        return f"blocks {ran} of the layer list did not run in the forward pass (not the decoder's blocks?)"
    hidden = record["hidden_states"]
    for layer in range(n - 1):
        error = mismatch(record["out"][layer], record["in"][layer + 1])
        if error > tol:
            return (f"block {layer}'s output is not block {layer + 1}'s input (differs "
                    f"{by(error, record['out'][layer], record['in'][layer + 1])})")
    if hidden is not None and len(hidden) == n + 1 and mismatch(record["in"][0], hidden[0]) > tol and all(
            mismatch(record["out"][layer], hidden[layer]) <= tol for layer in range(n - 1)):
        hidden = None  # Mamba's hidden states are the blocks' outputs: checked above, block to block
    if hidden is not None and len(hidden) == n + 1:
        for layer in range(n):
            error = mismatch(record["in"][layer], hidden[layer])
            if error > tol:
                return (f"residual row {layer} (block {layer}'s input) differs from output_hidden_states[{layer}] "
                        f"{by(error, record['in'][layer], hidden[layer])}")
        last = min(mismatch(record["out"][n - 1], hidden[n]), mismatch(record["norm_out"], hidden[n]))
        comparable = hidden[n].shape[-1] == record["out"][n - 1].shape[-1]  # not after OPT's project_out
        if comparable and last > tol:
            return (f"the last block's output (or its final norm) differs from output_hidden_states[{n}] "
                    f"{by(last, record['out'][n - 1], hidden[n])}")
        return None
    if hidden is not None and len(hidden) != n + 1:
        return f"the model returns {len(hidden)} hidden states for {n} blocks (expected {n + 1})"
    return None


def check_logits(hf, spec, record, tol):
    """The last row decoded against the model's logits, fitting the norm and a logit multiplier for a
    discovered spec; ``None`` or what did not match."""
    if record["logits"] is None:
        return "the model's forward returns no logits"
    last = record["out"][record["n"] - 1]
    if spec.get("discovered") and spec.get("final_norm") and mismatch(record["norm_in"], last) > tol:
        spec["final_norm"] = ""  # a norm registered after the blocks but applied elsewhere (BART's embeddings')
    if spec.get("discovered") and spec.get("final_norm"):
        fitted = fit_norm(architectures.get_path(hf, spec["final_norm"]), last, record["norm_out"], text_config(hf), tol)
        if fitted is None:
            return f"the final norm {spec['final_norm']!r} is neither a LayerNorm nor an RMSNorm (w or 1 + w)"
        spec.update(fitted)
    try:
        decoder = architectures.decoder_tensors(hf, spec)
    except LensError as error:
        return str(error)
    theirs = record["logits"].float()
    with torch.no_grad():
        ours = decoder.unembed(decoder.normalize(last.to(decoder.W_U.device)))
    error = mismatch(ours, theirs)
    if error > tol and spec.get("discovered") and decoder.softcap is not None:
        # a config field names a cap the forward does not apply (Gemma 3's multimodal model decodes uncapped)
        uncapped = architectures.decoder_tensors(hf, {k: v for k, v in spec.items() if k != "softcap_attr"})
        with torch.no_grad():
            plain = uncapped.unembed(uncapped.normalize(last.to(uncapped.W_U.device)))
        if mismatch(plain, theirs) <= tol:
            del spec["softcap_attr"]
            decoder, ours, error = uncapped, plain, mismatch(plain, theirs)
    if error > tol and spec.get("discovered") and decoder.softcap is None:
        field = fit_multiplier(ours, theirs, text_config(hf), tol)
        if field is not None:
            spec["logit_multiplier"] = field
            decoder = architectures.decoder_tensors(hf, spec)
            with torch.no_grad():
                ours = decoder.unembed(decoder.normalize(last.to(decoder.W_U.device)))
            error = mismatch(ours, theirs)
    if error > tol:
        return (f"the last row decoded through {spec.get('final_norm') or 'no final norm'!r} and "
                f"{spec['lm_head']!r} differs from the model's logits {by(error, ours, theirs)}")
    return None


def text_config(hf):
    return discovery.text_config(hf.config)


def fit_norm(norm, x, y, config, tol):
    """``{"norm_kind", "norm_one_plus", "norm_eps"}`` that reproduce the norm's recorded output ``y`` from its
    input ``x`` (``None`` if no LayerNorm / RMSNorm form does)."""
    module = getattr(norm, "_module", norm)
    eps = next((getattr(module, f) for f in EPS_FIELDS if isinstance(getattr(module, f, None), float)), None)
    candidates = [eps] if eps is not None else [
        getattr(config, f) for f in CONFIG_EPS_FIELDS if isinstance(getattr(config, f, None), float)] + [1e-5, 1e-6]
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    weight = weight if isinstance(weight, torch.Tensor) else None
    bias = bias if isinstance(bias, torch.Tensor) else None
    y = architectures.layer_output(y)
    forms = (("rmsnorm", False), ("rmsnorm", True), ("layernorm", False), ("layernorm", True))  # Nemotron: 1 + w
    for eps in candidates:
        for kind, one_plus in forms:
            if one_plus and weight is None:
                continue
            w = None if weight is None else (1.0 + weight.float() if one_plus else weight)
            ours = apply_final_norm(x, kind, w, bias if kind == "layernorm" else None, eps)
            if mismatch(ours, y) <= tol:
                return {"norm_kind": kind, "norm_one_plus": one_plus, "norm_eps": eps}
    return None


def fit_multiplier(ours, theirs, config, tol):
    """``(config field, "mul" | "div")`` when the model's logits are ours times a scalar that a config field
    named for logits, a scale or a multiplier holds (or whose inverse it holds); ``None`` otherwise."""
    scale = float((ours * theirs).sum() / (ours * ours).sum().clamp(min=1e-12))
    if mismatch(ours * scale, theirs) > tol:
        return None
    names = set(vars(config)) | {n for n in dir(type(config)) if isinstance(getattr(type(config), n, None), property)}
    fields = sorted((f for f in names if any(w in f for w in ("logit", "scal", "mult"))),
                    key=lambda f: "logit" not in f)  # a logit field first; never a size that happens to match
    for field in fields:
        try:
            value = getattr(config, field)
        except Exception:  # a per-layer field (Gemma 4) raises on global access
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value:
            for how, candidate in (("mul", float(value)), ("div", 1.0 / float(value))):
                if abs(candidate - scale) <= 1e-4 * abs(scale):
                    return (field, how)
    return None


def check_sublayers(hf, spec, record, tol):
    """Which children's outputs are the sublayer writes (block input + attention + MLP = block output, every
    block); a discovered spec learns them (and whether the blocks are parallel), a table entry is checked.
    On failure ``spec["sublayers_refused"]`` holds the reason."""
    n = record["n"]
    if not spec.get("discovered"):
        for layer in range(n):
            block = architectures.get_path(hf, spec["layers"])[layer]
            writes = [architectures.layer_output(record_child(record, block, layer, spec.get(f"{r}_out", spec.get(r))))
                      for r in ("attn", "mlp")]
            if any(w is None for w in writes) or mismatch(record["in"][layer] + writes[0].reshape(record["in"][layer].shape)
                                                           + writes[1].reshape(record["in"][layer].shape),
                                                           record["out"][layer]) > tol:
                spec["sublayers_refused"] = (f"block {layer}: its input plus the outputs of {spec.get('attn')!r} and "
                                             f"{spec.get('mlp')!r} is not its output")
                return
        return
    pairs = []
    for layer in range(n):
        pair = writes_pair(record, layer, tol)
        if pair is None:
            spec["sublayers_refused"] = (f"block {layer}: no two of its submodules' outputs "
                                         f"({list(record['children'][layer])}) add up with its input to its output "
                                         "(the residual is added inside a module, or more than two modules write)")
            return
        pairs.append(pair)
    attn_out, mlp_out = discovery.first_of(p[0] for p in pairs), discovery.first_of(p[1] for p in pairs)
    if isinstance(attn_out, tuple) or isinstance(mlp_out, tuple):
        if any(writes_pair_names(hf, spec, pairs, attn_out, mlp_out)):
            spec["sublayers_refused"] = f"the blocks differ in which submodules write: {pairs}"
            return
    spec.setdefault("attn", attn_out)
    spec.setdefault("mlp", mlp_out)
    if attn_out != spec["attn"]:
        spec["attn_out"] = attn_out
    if mlp_out != spec["mlp"]:
        spec["mlp_out"] = mlp_out
    block0 = architectures.get_path(hf, spec["layers"])[0]
    if "attn_out" in spec and "norm" in type(block0.get_submodule(pairs[0][0])).__name__.lower():
        spec["post_norms"] = True
    spec["parallel"] = parallel(record, pairs)


def writes_pair_names(hf, spec, pairs, attn_out, mlp_out):
    """For blocks whose writers differ (hybrids): per block, whether ``first that exists`` picks a wrong one."""
    blocks = architectures.get_path(hf, spec["layers"])
    def pick(block, names):
        return next(n for n in (names if isinstance(names, tuple) else (names,))
                    if architectures.get_path(block, n, optional=True) is not None)

    return [pick(blocks[layer], attn_out) != a or pick(blocks[layer], mlp_out) != m
            for layer, (a, m) in enumerate(pairs)]


def record_child(record, block, layer, path):
    if path is None:
        return None
    names = path if isinstance(path, tuple) else (path,)
    for name in names:
        if name in record["children"][layer]:
            return record["children"][layer][name]
        head, _, rest = name.partition(".")
        if rest and head in record["children"][layer]:  # a nested path (OPT's fc2): read it directly
            return None
    return None


def writes_pair(record, layer, tol):
    """``(first writer, second writer)``: the two children, in the order they ran, whose outputs add to the
    block's input to give its output."""
    resid, out = record["in"][layer], record["out"][layer]
    children = [(k, v) for k, v in record["children"][layer].items() if v.numel() == resid.numel()]
    for i, (a, va) in enumerate(children):
        for b, vb in children[i + 1:]:
            if mismatch(resid + va.reshape(resid.shape) + vb.reshape(resid.shape), out) <= tol:
                return a, b
    return None


def parallel(record, pairs):
    """Whether the second writer reads what the first read (one shared norm, or a norm of the block input),
    not the residual after the first: attention and MLP in parallel (GPT-J, Cohere, Falcon)."""
    inputs, children = record["child_in"][0], record["children"][0]
    first, second = pairs[0]
    mixer, feed = inputs.get(first), inputs.get(second)
    if mixer is None or feed is None:
        return False
    if mismatch(feed, mixer) == 0.0:
        return True
    resid = record["in"][0]
    return any(mismatch(inputs.get(name), resid) == 0.0 and mismatch(feed, value) == 0.0
               for name, value in children.items() if name not in pairs[0])


def check_heads(hf, spec, record, tol):
    """The per-head writes, as direct logit attribution splits them, against the attention write of every
    block; on failure ``spec["heads_refused"]`` holds the reason."""
    if spec.get("sublayers_refused"):
        return
    blocks = architectures.get_path(hf, spec["layers"])
    try:
        n_heads = dla.head_count(hf)
    except LensError as error:
        spec["heads_refused"] = str(error)
        return
    for layer in range(record["n"]):
        mixer = get_any(blocks[layer], spec.get("attn"))
        if not any(word in type(mixer).__name__ for word in ("Attention", "Attn")):
            # any linear layer's input splits into chunks that add up: only attention's chunks are heads
            spec["heads_refused"] = f"block {layer}'s token mixer ({type(mixer).__name__}) is not attention"
            return
        if layer not in record["proj_in"]:
            mixer = discovery.first_of([spec.get("attn")])
            spec["heads_refused"] = (f"block {layer}'s token mixer ({type(get_any(blocks[layer], mixer)).__name__}) has "
                                     "no attention output projection to split into heads")
            return
        o_proj = get_any(blocks[layer], spec["o_proj"])
        write_path = spec.get("attn_out", spec["attn"])
        write = record_child(record, blocks[layer], layer, write_path)
        post_norm = (architectures.norm_params(get_any(blocks[layer], write_path), spec.get("norm_one_plus"))
                     if spec.get("post_norms") else None)
        z = record["proj_in"][layer]
        try:
            heads, bias = dla.split_heads(z.reshape(-1, z.shape[-1]), o_proj, n_heads, post_norm)
        except Exception as error:
            spec["heads_refused"] = f"block {layer}: its output projection's input does not split into {n_heads} heads ({error})"
            return
        error = mismatch(heads.sum(1) + bias, write)
        if error > tol:
            spec["heads_refused"] = (f"block {layer}: the {n_heads} heads through {spec['o_proj']!r} do not add up to "
                                     f"the attention write (differ by {error:.2e}, relative)")
            return


def get_any(block, path):
    if path is None:
        return None
    names = path if isinstance(path, tuple) else (path,)
    for name in names:
        found = architectures.get_path(block, name, optional=True)
        if found is not None:
            return found
    return None

__all__ = [
    "CONFIG_EPS_FIELDS",
    "EPS_FIELDS",
    "HALF_TOLERANCE",
    "TOKENS",
    "TOLERANCE",
    "VERDICTS",
    "by",
    "check_heads",
    "check_logits",
    "check_rows",
    "check_sublayers",
    "fit_multiplier",
    "fit_norm",
    "get_any",
    "mismatch",
    "parallel",
    "projection_paths",
    "record_child",
    "resolve",
    "run",
    "spec_key",
    "text_config",
    "tolerance",
    "verify",
    "weights_here",
    "writes_pair",
    "writes_pair_names",
]
