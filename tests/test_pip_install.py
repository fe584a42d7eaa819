"""A new user's path without make (issue 30): a fresh venv, pip alone, ``lens-plugins get-model``, then the
README's quick-start command, in a scratch directory where the checkout is not importable.

torch is installed as the Makefile installs it (``torch==2.13.0``, the CPU build, from the pip index and the
local wheel directory pip is configured with); lens_plugins from this checkout's path with the
``transformer-lens`` extra, spelled as docs/install.md spells it (non-editable, so a file missing from the package shows); the default model by
``get-model`` into a fresh cache directory, so its conversion runs too. The hub is off
(``HF_HUB_OFFLINE=1``): nothing may come from a model hub. Slow: minutes of pip and a model conversion.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_readme_blocks import README, SHELL, readme_blocks

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def quick_start_command() -> str:
    """The README's command-line quick start, as its test runs it."""
    shell = [b for b in readme_blocks(README.read_text(encoding="utf-8")) if b.lang in SHELL and not b.skip]
    commands = [b.runnable() for b in shell if b.runnable().startswith("lens-plugins ")]
    assert len(commands) == 1, commands
    return commands[0]


def test_pip_alone_then_the_quick_start(tmp_path):
    venv, work, cache = tmp_path / "venv", tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", LENS_PLUGINS_CACHE=str(cache),
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")

    def run(*command, timeout=900):
        proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{command} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        return proc

    makefile = (ROOT / "Makefile").read_text()
    torch = re.search(r"^TORCH := (\S+)", makefile, re.MULTILINE)[1]
    run(sys.executable, "-m", "venv", str(venv))
    pip = str(venv / "bin" / "pip")
    run(pip, "install", "-q", torch)
    # The venv's own pip, as a user has it (3.11's is 23.2, which ignores the underscore spelling of the extra).
    run(pip, "install", "-q", f"{ROOT}[transformer-lens]")
    run(str(venv / "bin" / "python"), "-c", "import transformer_lens")
    where = run(str(venv / "bin" / "python"), "-c", "import lens_plugins; print(lens_plugins.__file__)").stdout
    assert where.startswith(str(venv)), where  # the installed package, not the checkout

    got = run(str(venv / "bin" / "lens-plugins"), "get-model")
    model_dir = Path(got.stdout.strip())
    assert model_dir.parent == cache and (model_dir / "model.safetensors").exists(), got.stdout
    assert "converting" in got.stderr and "done in" in got.stderr

    lensed = run("bash", "-e", "-c", quick_start_command())
    row = next(line for line in lensed.stdout.splitlines() if line.startswith("29_post"))
    assert re.search(r"' Paris' 0\.7\d", row), lensed.stdout  # the model's answer at the last position
    assert (work / "lens.html").stat().st_size > 1_000_000  # plotly inlined: it opens offline
    assert "Loading weights" not in lensed.stderr and "Traceback" not in lensed.stderr, lensed.stderr
    assert "running the logit lens: done in" in lensed.stderr
