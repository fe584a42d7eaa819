"""TransformerLens (``TransformerBridge`` on T5 / BART) side of the DecoderLens; the method is described in
``lens_plugins.remote_decoder_lens``. The same batch of ``n_encoder_layers + 1`` copies runs with hooks
instead of an nnsight trace: ``encoder_blocks.{i}.hook_in`` records the encoder rows, the last encoder
block's ``hook_out`` hands copy ``i`` row ``i``, and the last decoder block's ``hook_out`` is decoded."""

from collections.abc import Sequence
from typing import Optional, Union

import torch

from lens_plugins import prompt
from lens_plugins.adapters.nnsight_decoder_lens import decoder_lens_result
from lens_plugins.architectures import decoder_tensors, get_path
from lens_plugins.logit_lens import eval_mode
from lens_plugins.prompt import readout_reductions, resolve_positions, single_token_id, target_columns
from lens_plugins.readout import lens_statistics
from lens_plugins.remote_decoder_lens import FORMAT, encoder_decoder_spec
from lens_plugins.result import LensResult
from lens_plugins.typecheck import typechecked


def _unwrapped(module):
    """The Hugging Face module under a bridge component (booting a bridge wraps the HF module tree)."""
    return getattr(module, "original_component", None) or getattr(module, "_original_component", None) or module


@typechecked
def run_decoder_lens(
    model,
    input_ids: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    *,
    top_k: int = 10,
    targets: Sequence[Union[str, int]] = (),
    positions: Optional[Union[int, Sequence[int]]] = None,
    reductions: Sequence[str] = prompt.DEFAULT_LENS_REDUCTIONS,
) -> LensResult:
    """The DecoderLens of one example (``[1, seq]`` encoder and decoder ids) on a TransformerBridge."""
    hf = model.original_model
    spec = encoder_decoder_spec(hf)
    n = len(get_path(hf, spec["encoder_layers"]))
    n_dec = len(get_path(hf, spec["layers"]))
    reductions = prompt.check_reductions(reductions)
    rows = []

    def record(value, hook):
        rows.append(value[len(rows)].detach().clone())

    def replace(value, hook):
        rows.append(value[n].detach().clone())
        return torch.stack(rows).to(value.dtype)

    captured = {}

    def read(value, hook):
        captured["resid"] = value.detach()

    hooks = [(f"encoder_blocks.{i}.hook_in", record) for i in range(n)]
    hooks += [(f"encoder_blocks.{n - 1}.hook_out", replace), (f"decoder_blocks.{n_dec - 1}.hook_out", read)]
    with eval_mode(model), torch.no_grad():
        model.run_with_hooks(input_ids.repeat(n + 1, 1), decoder_input=decoder_input_ids.repeat(n + 1, 1),
                             fwd_hooks=hooks)
    shim = _Unwrapped(hf)
    decoder = decoder_tensors(shim, spec)
    d_vocab = decoder["W_U"].shape[1]
    token_ids = decoder_input_ids[:1].cpu().long()
    chosen = resolve_positions(positions, token_ids.shape[1])
    user_ids = [single_token_id(model.tokenizer, t, d_vocab) for t in targets]
    per_token = target_columns(token_ids, torch.ones_like(token_ids), chosen, reductions, user_ids)
    with torch.no_grad():
        stats = lens_statistics(captured["resid"][:, chosen].float(), **{k: v.detach() if torch.is_tensor(v) else v
                                                                          for k, v in decoder.items()},
                                top_k=top_k, target_ids=per_token, reductions=readout_reductions(reductions, len(user_ids)))
    lens = {"format": FORMAT, "stats": stats, "positions": chosen, "reductions": list(reductions),
            "labels": ["embed"] + [f"{layer}_pre" for layer in range(1, n)] + [f"{n - 1}_post"],
            "token_ids": token_ids, "target_names": [t if isinstance(t, str) else None for t in targets],
            "target_ids": user_ids}
    return decoder_lens_result(lens, model)


class _Unwrapped:
    """Attribute access through a booted bridge's HF model that yields the original HF modules."""

    def __init__(self, module):
        self._module = _unwrapped(module)
        self.config = getattr(self._module, "config", None)

    def __getattr__(self, name):
        value = getattr(self._module, name)
        return _Unwrapped(value) if isinstance(value, torch.nn.Module) else value

    def __getitem__(self, index):
        return _Unwrapped(self._module[index])
