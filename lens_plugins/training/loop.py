"""Training a lens-like module against a frozen model: text sources, a held-out split, and one generic loop.

The loop knows nothing of tuned lenses. It trains any ``torch.nn.Module`` on a tensor of token blocks with a
``loss_fn(module, batch)`` the caller writes, so another lens (a Future Lens probe, a per-layer decoder) reuses
it with its own module and loss. Its defaults are the tuned-lens recipe (Belrose et al. 2023, and the
reference package's ``train`` script): SGD with Nesterov momentum 0.9 at learning rate ``lr * (1 - momentum)``
(torch's momentum scales steps by ``1 / (1 - momentum)``; undone, the best ``lr`` is about 1), weight decay
1e-3, gradient norm clipped at 1, the rate decayed linearly to zero, no warm-up.

Determinism and resuming: the batch of step ``s`` is a function of ``(seed, s)`` alone (each epoch is a
permutation drawn from a generator seeded with ``seed`` and the epoch), and a checkpoint holds the module,
the optimizer's momentum, the schedule, the step and the history, so a run stopped at any checkpoint and
resumed gives the module, bit for bit, that an uninterrupted run gives. With a checkpoint directory the state
is saved every ``CHECKPOINT_EVERY`` steps by default, at the end, and when Ctrl-C or SIGTERM stops the run (then
the interrupt goes on as it came); it holds tensors and plain containers only and is read with
``weights_only=True`` (``lens_plugins.files.load_tensors``), so a checkpoint directory from elsewhere cannot run
code.

Text sources (``load_texts``): a list of strings, a ``.txt`` file (documents separated by blank lines), a
``.jsonl`` file (one object per line, its ``"text"`` field), or ``None`` for the built-in offline corpus: the
English prose of the Python reference manual that CPython ships in ``pydoc_data.topics`` (about 465,000
characters, 110,000 SmolLM2 tokens; nothing downloaded).
"""

import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from lens_plugins.core.errors import LensFileNotFoundError, LensFloatingPointError, LensTypeError, LensValueError
from lens_plugins.files import atomic_write, check_dir, load_tensors

TextSource = Union[None, str, os.PathLike, Sequence[str]]
STATE_FILE = "train_state.pt"
CHECKPOINT_EVERY = 25
"""Default steps between checkpoints: a hard kill (out of memory, a lost node) costs at most this many steps;
Ctrl-C and SIGTERM cost none (the state is saved on the way out)."""


def builtin_corpus() -> list[str]:
    """The Python reference manual's topics (``pydoc_data.topics``), one document per topic, in key order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def load_texts(source: TextSource = None, text_field: str = "text") -> list[str]:
    """Documents from ``source``: ``None`` (the built-in corpus), a list of strings, or a ``.txt`` / ``.jsonl``
    file path."""
    if source is None:
        return builtin_corpus()
    if isinstance(source, (str, os.PathLike)) and (isinstance(source, os.PathLike) or source.endswith((".txt", ".jsonl"))):
        path = Path(source)
        if not path.exists():
            raise LensFileNotFoundError(f"no text file at {path}: give a .txt or .jsonl file, a list of strings, "
                                    "or None for the built-in corpus")
        if path.suffix == ".jsonl":
            texts = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise LensValueError(f"{path}:{number} has no string field {text_field!r}; each line must be a "
                                     f'JSON object like {{"{text_field}": "..."}} (or pass text_field=...)')
                texts.append(record[text_field])
        elif path.suffix == ".txt":
            texts = [part for part in path.read_text(encoding="utf-8").split("\n\n") if part.strip()]
        else:
            raise LensValueError(f"{path} is neither .txt nor .jsonl: those are the text files training reads")
    elif isinstance(source, str):
        raise LensValueError(f"{source[:60]!r} is a string, not a list of texts or a .txt/.jsonl path: wrap a single "
                         "text in a list")
    else:
        texts = list(source)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise LensTypeError(f"text {bad[0]} is a {type(texts[bad[0]]).__name__}, not a string")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LensValueError("the text source holds no text: training and evaluation need some")
    return texts


def token_blocks(texts: Sequence[str], tokenizer, seq_len: int) -> Tensor:
    """``[blocks, seq_len]`` token ids: the documents tokenised, joined by the EOS token (as tuned-lens does)
    and cut into full blocks; the remainder is dropped, so every block is a full context with no padding."""
    if seq_len < 2:
        raise LensValueError(f"seq_len must be at least 2 (a position and its next token), got {seq_len}")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise LensValueError(f"the text is {len(ids)} tokens, fewer than one block of seq_len={seq_len}: give more "
                         "text or a smaller seq_len")
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).reshape(n_blocks, seq_len)


def split_heldout(blocks: Tensor, heldout: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(train, heldout)``: a seeded random ``heldout`` fraction of the blocks (at least one) is set aside
    for evaluation, never trained on."""
    if not 0 < heldout < 1:
        raise LensValueError(f"heldout is a fraction in (0, 1), got {heldout}")
    n_held = max(1, round(len(blocks) * heldout))
    if n_held >= len(blocks):
        raise LensValueError(f"{len(blocks)} blocks cannot be split into training and held-out sets: give more text")
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    return blocks[order[n_held:].sort().values], blocks[order[:n_held].sort().values]


@dataclass
class TrainConfig:
    """The optimisation recipe; the defaults are tuned-lens's (see the module docstring)."""

    steps: int = 250
    lr: float = 1.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-3
    clip_grad_norm: Optional[float] = 1.0
    warmup_steps: int = 0
    batch_size: int = 1
    """Blocks per micro-batch (one forward pass of the model)."""
    accumulate: int = 1
    """Micro-batches per optimiser step: tokens per step = accumulate x batch_size x seq_len."""
    seed: int = 0
    checkpoint_every: int = CHECKPOINT_EVERY
    """Save a resumable checkpoint every this many steps when a checkpoint dir is given (0: only at the end and
    on an interrupt). It does not change the result, so a run may resume with another value."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "accumulate"):
            if getattr(self, name) < 1:
                raise LensValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise LensValueError(f"warmup_steps must lie in 0..steps-1 ({self.steps - 1}), got {self.warmup_steps}")
        if self.lr <= 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise LensValueError("lr must be positive, momentum in [0, 1) and weight_decay non-negative, got "
                             f"lr={self.lr}, momentum={self.momentum}, weight_decay={self.weight_decay}")


def make_optimizer(params: Iterable[Tensor], config: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(list(params), lr=config.lr * (1 - config.momentum), momentum=config.momentum,
                           nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then linear decay to zero at ``steps``."""
    warm, total = config.warmup_steps, config.steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / (total - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batch_indices(n_items: int, step: int, micro: int, config: TrainConfig) -> Tensor:
    """Which items micro-batch ``micro`` of step ``step`` trains on: a function of the seed and step only,
    so that a resumed run sees exactly the batches an uninterrupted one would."""
    per_epoch = n_items
    start = (step * config.accumulate + micro) * config.batch_size
    out = []
    for k in range(start, start + config.batch_size):
        epoch, offset = divmod(k, per_epoch)
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
        out.append(order[offset])
    return torch.stack(out)


LossOutput = Union[Tensor, Iterable[tuple[str, Tensor]]]


class _Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM while ``fit`` runs arrive as ``KeyboardInterrupt``, at once, except inside an
    optimiser update (``optimizer.step``, ``schedule.step``, the history entry): there they wait for the update
    to finish, so the checkpoint saved on the way out holds a module, momentum and schedule of the same step.
    ``signal`` records which one came. Handlers can be installed only from the main thread; elsewhere a
    ``KeyboardInterrupt`` is still caught and checkpointed, just not deferred."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._updating = self._pending = False
        self._previous: dict = {}

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        if self._updating:
            self._pending = True
        else:
            signal.default_int_handler(signum, frame)  # Python's own Ctrl-C: raises KeyboardInterrupt

    @contextmanager
    def update(self):
        self._updating = True
        try:
            yield
        finally:
            self._updating = False
        if self._pending:
            signal.default_int_handler(self.signal, None)  # the interrupt held back, delivered now


def fit(
    module: torch.nn.Module,
    data: Tensor,
    loss_fn: Callable[[torch.nn.Module, Tensor], LossOutput],
    config: TrainConfig = TrainConfig(),
    *,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    progress: bool = False,
    description: str = "training",
) -> list[dict]:
    """Train ``module``'s parameters that require grad on ``data`` (``[items, ...]``, e.g. token blocks).

    ``loss_fn(module, batch)`` gets ``data[indices]`` and returns a scalar loss, or an iterable of
    ``(name, scalar loss)`` pairs: each pair is back-propagated as soon as it is produced (so a per-layer loss
    frees its graph before the next layer's is built) and logged under its name; the step minimises their sum.
    With ``checkpoint`` (a directory), the state is saved there every ``config.checkpoint_every`` steps, at
    the end and on Ctrl-C or SIGTERM (then the interrupt is re-raised; SIGTERM goes to the handler it had
    before), the directory is printed to stderr when training starts and when it is interrupted, and a run
    finding a state there resumes from it. Returns the history: one dict per step with ``step``, ``loss`` (the
    sum), ``lr`` and each named loss, averaged over the step's micro-batches.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise LensValueError("the module has no parameter that requires grad: nothing to train")
    if len(data) == 0:
        raise LensValueError("no training data")
    optimizer = make_optimizer(params, config)
    schedule = make_schedule(optimizer, config)
    history: list[dict] = []
    start = 0
    state_path = check_dir(checkpoint, overwrite=True) / STATE_FILE if checkpoint is not None else None
    if state_path is not None and state_path.exists():
        state = load_tensors(state_path, f"delete {state_path} (or its directory) to train from the start")
        recipe = {k: v for k, v in asdict(config).items() if k != "checkpoint_every"}
        if {k: v for k, v in state["config"].items() if k != "checkpoint_every"} != recipe:
            changed = sorted(k for k, v in recipe.items() if state["config"].get(k) != v)
            raise LensValueError(f"the checkpoint at {state_path} was trained with another configuration ({changed} "
                             "differ): resume with the same settings, or use a fresh checkpoint directory")
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, history = state["step"], state["history"]
    if state_path is not None:
        print(f"{description}: checkpoint in {state_path.parent} ("
              + (f"step {start} of {config.steps} restored; " if start else "")
              + (f"every {config.checkpoint_every} steps, " if config.checkpoint_every else "")
              + "at the end and on Ctrl-C); run the same call again to resume", file=sys.stderr)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=description, unit="step")
    interrupts = _Interrupts()
    try:
        with interrupts:
            for step in range(start, config.steps):
                optimizer.zero_grad(set_to_none=True)
                record: dict[str, float] = {}
                for micro in range(config.accumulate):
                    batch = data[batch_indices(len(data), step, micro, config)]
                    output = loss_fn(module, batch)
                    pairs = [("loss", output)] if isinstance(output, Tensor) else output
                    for name, loss in pairs:
                        (loss / config.accumulate).backward()
                        record[name] = record.get(name, 0.0) + float(loss.detach()) / config.accumulate
                if config.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
                entry = {"step": step + 1, "lr": optimizer.param_groups[0]["lr"]}
                entry["loss"] = record["loss"] if list(record) == ["loss"] else sum(record.values())
                entry.update({k: v for k, v in record.items() if k != "loss"})
                if not math.isfinite(entry["loss"]):
                    raise LensFloatingPointError(f"the training loss became {entry['loss']} at step {step + 1}: lower "
                                                 "lr, or check the data")
                with interrupts.update():
                    optimizer.step()
                    schedule.step()
                    history.append(entry)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{entry['loss']:.4f}")
                done = step + 1 == config.steps
                if state_path is not None and (done or (config.checkpoint_every
                                                        and (step + 1) % config.checkpoint_every == 0)):
                    save_state(state_path, module, optimizer, schedule, step + 1, history, config)
    except KeyboardInterrupt:
        if state_path is not None:  # every update is whole (see _Interrupts): the state is that of step len(history)
            save_state(state_path, module, optimizer, schedule, len(history), history, config)
            print(f"{description}: interrupted after step {len(history)} of {config.steps}; state saved in "
                  f"{state_path.parent}: run the same call again to resume", file=sys.stderr)
        if interrupts.signal == signal.SIGTERM:
            signal.raise_signal(signal.SIGTERM)  # to the handler it had before (by default: terminate)
        raise
    finally:
        if bar is not None:
            bar.close()
    return history


def save_state(path: Path, module, optimizer, schedule, step: int, history: list, config: TrainConfig) -> None:
    """Write the resumable state atomically (a crash mid-write leaves the previous checkpoint intact), as tensors
    and plain containers only: what ``load_tensors`` (``weights_only=True``) reads back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"module": module.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "step": step, "history": history, "config": asdict(config)}
    with atomic_write(path) as staging:
        torch.save(state, staging)

__all__ = ["TextSource", "STATE_FILE", "CHECKPOINT_EVERY", "builtin_corpus", "load_texts", "token_blocks", "split_heldout",
    "TrainConfig", "make_optimizer", "make_schedule", "batch_indices", "LossOutput", "fit", "save_state"]
