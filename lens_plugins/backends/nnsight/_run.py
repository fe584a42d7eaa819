"""How the nnsight one-call forms run a trace: the shared guards around ``model.trace`` (prompts, context,
eval mode, padding side), a lens made shippable, and remote failures named as ``RemoteLensError``.

Importing it registers every module of ``lens_plugins.core`` (``core.SHIPPED``) with ``nnsight.register``:
they ship by source and import only torch, so an NDIF server needs nothing of ours."""

import contextlib
import importlib
import warnings
from pathlib import Path
from typing import Union

import nnsight
import torch

from lens_plugins import core
from lens_plugins.backends._common import (
    check_context,
    check_one_prompt_ids,
    check_prompts,
    context_length,
    eval_mode,
    pad_prompts,
    processor_inputs,
    prompt_ids,
    unwrap,
)
from lens_plugins.backends.nnsight.reader import lens_tensors
from lens_plugins.core.errors import LensTypeError, LensValueError, RemoteLensError

SHIPPED_MODULES = tuple(importlib.import_module(f"lens_plugins.core.{name}") for name in core.SHIPPED)
for _module in SHIPPED_MODULES:
    nnsight.register(_module)


class RemoteJob:
    """A remote one-call form submitted with ``blocking=False``: the job runs on the NDIF server while the caller
    goes on, and ``result()`` assembles the same result type the blocking call returns.

    ``job_id`` is the server's id; ``status()`` asks the server once (``"RECEIVED"``, ``"QUEUED"``, ``"RUNNING"``,
    ``"COMPLETED"``, ...; ``"PENDING"`` before the server recorded any); ``done()`` is whether the result is in;
    ``result(timeout=None)`` waits for it (a job error or a timeout raises ``RemoteLensError``, as a blocking
    call would); ``cancel()`` stops this handle waiting and drops the result: NDIF (0.1.2) has no endpoint to stop
    a submitted job, so the server still runs it to the end. Several jobs can be in flight from one client; each
    handle polls only its own job (``GET /response/{job_id}``, no websocket held open)."""

    def __init__(self, backend, label):
        self._backend, self._label = backend, label
        self._saved, self._cancelled = None, False

    @property
    def job_id(self) -> str:
        return self._backend.job_id

    def __repr__(self) -> str:
        return f"RemoteJob({self.job_id!r}, status={self._last_status()!r})"

    def _last_status(self) -> str:
        if self._cancelled:
            return "CANCELLED"
        status = self._backend.status
        return "PENDING" if status is None else getattr(status, "name", str(status))

    def _poll(self) -> None:
        if self._saved is not None or self._cancelled:
            return
        try:
            saved = self._backend.poll()
        except Exception as error:  # noqa: BLE001 - named as a remote failure, as a blocking call names it
            raise remote_error(error, True, self._backend) from error
        if isinstance(saved, dict):
            self._saved = saved

    def status(self) -> str:
        """The job's latest status, asked of the server now."""
        self._poll()
        return "COMPLETED" if self._saved is not None else self._last_status()

    def done(self) -> bool:
        return self.status() == "COMPLETED"

    def result(self, timeout=None, interval: float = 0.25):
        """The call's result (``LensResult``, ``Attribution``, ...), waiting up to ``timeout`` seconds (``None``:
        as long as it takes) and asking the server every ``interval`` seconds."""
        import time

        if self._cancelled:
            raise RemoteLensError(f"job {self.job_id} was cancelled on this client: its result was dropped")
        start = time.monotonic()
        while self.status() != "COMPLETED":
            if timeout is not None and time.monotonic() - start > timeout:
                raise RemoteLensError(f"job {self.job_id} did not finish within {timeout} s (status "
                                      f"{self._last_status()}); call result() again to keep waiting")
            time.sleep(interval)
        if "saved" not in self._saved:
            raise RemoteLensError(f"job {self.job_id} finished without the saved result (got {sorted(self._saved)})")
        return self._label(self._saved["saved"])

    def cancel(self) -> None:
        """Stop waiting for this job and drop its result (the server still finishes it: NDIF 0.1.2 cannot stop a job)."""
        self._cancelled = True


def submit(model, prompt, remote, body, label, padding_side=None, prepend_bos=None):
    """``trace`` without waiting: the request is sent to the NDIF server (``remote=True`` or a host URL) and a
    ``RemoteJob`` comes back, whose ``result()`` applies ``label`` to what the body saved."""
    if remote is False or remote == "local":
        raise LensValueError(f"blocking=False submits a job to an NDIF server: it needs remote=True (or a host URL), "
                             f"got remote={remote!r}; a local trace has nothing to wait for")
    backend = trace(model, prompt, remote, None, body, padding_side, prepend_bos, blocking=False)
    return RemoteJob(backend, label)


def run(model, prompt, remote, backend, body, label, blocking=True, padding_side=None, prepend_bos=None):
    """The one-call forms' last step: ``label(trace(...))``, or with ``blocking=False`` a ``RemoteJob``."""
    if not blocking:
        if backend is not None:
            raise LensValueError("blocking=False makes its own non-blocking remote backend: pass remote=True "
                                 "(or a host URL), not backend=")
        return submit(model, prompt, remote, body, label, padding_side, prepend_bos)
    return label(trace(model, prompt, remote, backend, body, padding_side, prepend_bos))


def trace(model, prompt, remote, backend, body, padding_side=None, prepend_bos=None, blocking=True):
    """Run ``body()`` inside ``model.trace(prompt)`` with the one-call guards (prompts, context, eval mode),
    a batch padded on ``padding_side`` (default the tokenizer's, as on TransformerLens), and name a remote
    failure. The prompts are the ids of ``prompt_ids`` (the rule TransformerLens's one-call forms use): the
    text itself goes to the trace when that is the tokenizer's own tokenization (``prepend_bos=None``, or a
    setting the tokenizer already does), its padded ids and mask when ``prepend_bos`` changes it. With
    ``blocking=False`` the job is only submitted and the trace's remote backend (holding its job id) returned.
    A prompt given as model inputs (a processor's output, with an image's ``pixel_values``) goes to the trace as
    it is (``_common.processor_inputs``)."""
    if padding_side not in (None, "left", "right"):
        raise LensValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    check_remote(model, remote, backend)
    tokenizer = model.tokenizer
    inputs = processor_inputs(model, prompt)  # model inputs (an image's pixel_values among them) run as given
    if inputs is None:
        prompts = check_prompts(prompt)
        own = [prompt_ids(tokenizer, text, None) for text in prompts]
        ids = own if prepend_bos is None else [prompt_ids(tokenizer, text, prepend_bos) for text in prompts]
        check_context(max(len(one) for one in ids), context_length(model))
    else:
        prompt, ids, own = inputs, None, None
    trace_kwargs = {"remote": remote} if backend is None else {"backend": backend}
    if not blocking:
        trace_kwargs["blocking"] = False
    side = tokenizer.padding_side
    tokenizer.padding_side = padding_side or side  # the batch is tokenized when the trace starts
    if ids != own:
        tokens, mask = pad_prompts(tokenizer, ids, tokenizer.padding_side)
        prompt = {"input_ids": tokens, "attention_mask": mask}
    try:
        with eval_mode(unwrap(model)), torch.no_grad(), model.trace(prompt, **trace_kwargs) as tracer:
            saved = body()
    except Exception as error:  # noqa: BLE001 - re-raised below with what happened, unless it is ours
        raise remote_error(error, remote, backend) from error
    finally:
        tokenizer.padding_side = side
    return saved if blocking else tracer.backend


PUBLIC_NDIF = "ndif.us"  # the public service's domain (nnsight's default host, https://api.ndif.us)


def check_remote(model, remote, backend) -> None:
    """Before a ``remote=True`` request to the public NDIF service, refuse what it cannot run, naming the fix:
    a model whose repo id is a local directory (NDIF loads its own copy by Hugging Face id; nnsight would fail
    with a bare ``HFValidationError``), and a missing API key. A server of your own (``NDIF_HOST``, ``make
    ndif-up``) may load a local directory and need no key, so it is not checked."""
    if remote is not True or backend is not None or PUBLIC_NDIF not in str(nnsight.CONFIG.API.HOST):
        return
    repo = getattr(model, "repo_id", None)
    if isinstance(repo, str) and (Path(repo).expanduser().exists() or Path(repo).is_absolute() or repo.startswith(".")):
        raise RemoteLensError(
            f"remote=True sends the model's repo id to NDIF, which loads its own copy of the weights; this model's id "
            f"is the local directory {repo!r}, which NDIF cannot load. Name a model NDIF hosts, e.g. "
            "lp.nnsight.remote_model(\"meta-llama/Llama-3.1-8B\"), or run locally: remote=False (or remote=\"local\" "
            "to rehearse the request's serialisation)")
    if not nnsight.CONFIG.API.APIKEY:
        raise RemoteLensError(
            f"remote=True needs an NDIF API key for {nnsight.CONFIG.API.HOST}: set the NDIF_API_KEY environment "
            "variable or call nnsight.CONFIG.set_default_api_key(KEY) (keys at https://login.ndif.us), or run "
            "locally with remote=False")


def shippable(model, lens, remote, backend, **rows):
    """The lens as it can travel: itself for a local trace, its tensors for a remote one (tensors already made
    by ``lens_tensors`` travel as they are)."""
    if lens is None or isinstance(lens, dict) or (remote is False and backend is None):
        return lens
    return lens_tensors(model, lens, **rows)


def remote_error(error: Exception, remote, backend) -> Exception:
    """Name a remote failure; leave a local error (a bad target, a wrong path) as it is."""
    if remote is False and backend is None:
        return error
    from nnsight.intervention.backends.remote import RemoteError

    kind = type(error).__name__
    message = str(error).lower()
    # NDIF says "Your job exceeded the execution timeout of 20.0s." when it stops a job itself.
    timed_out = "timed out" in message or "execution timeout" in message
    # An HTTP reply that is not NDIF's (a 404 from a wrong host) fails nnsight's first step, the websocket
    # handshake, with the HTTP status on the error (``WebSocketBadStatusException.status_code``).
    status = getattr(error, "status_code", None)
    if isinstance(status, int):
        host = getattr(backend, "host", None) or nnsight.CONFIG.API.HOST
        return RemoteLensError(
            f"the server at {host} did not answer as an NDIF server (HTTP {status}: {kind}): check "
            "nnsight.CONFIG.API.HOST (or the backend's host) names an NDIF server, or run the same lens locally "
            "with remote=False. Nothing local was changed.")
    if isinstance(error, TimeoutError) or timed_out or "Timeout" in kind:
        what = "the remote job timed out"
    elif isinstance(error, RemoteError) and "Failed to send request" in str(error) or isinstance(error, OSError):
        what = "the NDIF server could not be reached"
    elif isinstance(error, RemoteError):
        what = "the remote job failed on the server"
    else:
        return error
    return RemoteLensError(
        f"{what}: {kind}: {error}. Nothing local was changed; retry later, check nnsight.CONFIG.API.HOST and "
        "your API key, or run the same lens locally with remote=False."
    )


def trace_kwargs(remote, backend, model=None) -> dict:
    """``model.trace`` / ``model.generate``'s keywords for ``remote`` or ``backend``, after ``check_remote``."""
    if model is not None:
        check_remote(model, remote, backend)
    return {"remote": remote} if backend is None else {"backend": backend}


@contextlib.contextmanager
def generation_ends(record: dict):
    """Hold back nnsight's "'...' was never reached: the loop asked for a step the run did not make, so it was
    cut short" warning, which a generation that meets its end-of-text token before ``max_new_tokens`` raises
    from inside a step-by-step body: that is a normal end, and ``stopped_early`` says where it stopped instead.
    Every other warning is passed on. ``record["cut"]`` tells whether the warning came."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        text = str(warning.message)
        if "was never reached" in text and "cut short" in text:
            record["cut"] = True
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def stopped_early(what: str, generated: list, max_new_tokens: int, tokenizer) -> None:
    """Warn where a generation stopped when it made fewer than ``max_new_tokens`` tokens: the last one ends
    generation (the model's end-of-text token, or a stop the caller set); the result holds every step."""
    if len(generated) >= max_new_tokens:
        return
    last = tokenizer.decode([generated[-1]]) if generated else None
    where = f"after {len(generated)} of max_new_tokens={max_new_tokens} tokens"
    ending = f" at {last!r}, a token that ends generation" if last is not None else ""
    warnings.warn(f"{what} stopped {where}{ending}: a normal end of text; the result holds every step that ran",
                  UserWarning, stacklevel=3)


def one_prompt(model, text: Union[str, torch.Tensor], max_new_tokens: int, prepend_bos=None) -> Union[str, torch.Tensor]:
    """What ``model.generate`` runs for one prompt, checked to fit the model's context with the
    ``max_new_tokens`` to be generated after it: ``[1, seq]`` token ids as given; text as itself when
    ``prompt_ids`` leaves the tokenizer's tokenization, else as its ids ``[1, seq]``."""
    if isinstance(text, torch.Tensor):
        check_one_prompt_ids(model, text)
        check_context(text.shape[1], context_length(model), max_new_tokens)
        return text
    if not isinstance(text, str):
        raise LensTypeError("generation takes one prompt (a string or [1, seq] token ids); run a batch prompt by prompt")
    check_prompts(text)
    ids = prompt_ids(model.tokenizer, text, prepend_bos)
    check_context(len(ids), context_length(model), max_new_tokens)
    return text if ids == prompt_ids(model.tokenizer, text, None) else torch.tensor([ids])

__all__ = ["SHIPPED_MODULES", "PUBLIC_NDIF", "check_remote", "RemoteJob", "submit", "run", "trace", "shippable",
    "remote_error", "trace_kwargs", "generation_ends", "stopped_early", "one_prompt"]
