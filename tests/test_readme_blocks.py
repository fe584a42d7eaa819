"""Every fenced code block of README.md and of every page of docs/ runs (issues 18 and 30), so a renamed
argument breaks a test, not a reader.

Rules (for whoever adds a README section or a docs page):

- ```` ```python ```` blocks of one file run in order in one fresh interpreter, all in **one shared namespace**
  per file (README.md, or one page of docs/), like the cells of one notebook: a block may use names an earlier
  block of the same file defined; each file starts empty, so a page's first block imports ``lens_plugins`` and
  loads its model. A later block that rebinds a name (``model``) changes it for the blocks after it, so a
  section that needs a particular model should load it itself. They run on the real
  default model (SmolLM2-135M-Instruct), whichever backend each block loads, in a scratch directory, with
  plotly's renderer set to ``json`` (``fig.show()`` prints instead of opening a browser).
- ```` ```bash ```` / ```` ```sh ```` / ```` ```shell ```` / ```` ```console ```` blocks run through ``bash -e`` in a
  scratch directory, with this interpreter's ``bin`` (``lens-plugins``) first on ``PATH``.
- Blocks in another language or none (```` ```text ````, output listings) are not run; a bare block whose
  first line looks like a command or Python is an error: label it.
- A block that cannot run here as written is marked by HTML comments right before its fence:
  ``<!-- readme-test: replace OLD => NEW -->`` substitutes text before running (repeatable; e.g.
  ``remote=True => remote="local"``, which runs the same request through nnsight's serialisation locally),
  ``<!-- readme-test: run: COMMAND -->`` runs ``COMMAND`` instead of a synopsis line, and
  ``<!-- readme-test: skip: REASON -->`` does not run it, for a stated reason (printed by the test). A
  python block that asks for NDIF (``remote=True``, an API key) without a ``replace`` marker fails: the test
  machine has no NDIF access, and a silent skip would hide a broken example.
"""

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
FILES = [README, *DOCS]
SHELL = {"bash", "sh", "shell", "console"}
PYTHON = {"python", "py", "python3"}
NEEDS_NDIF = re.compile(r"remote\s*=\s*True|api_key|NDIF_API_KEY")
LOOKS_LIKE_CODE = re.compile(r"^\s*(import |from \S+ import |lens-plugins |python |make |pip |[a-z_]+\s*=\s*lp\.)")


@dataclass
class Block:
    line: int  # 1-based line of the first line of code
    lang: str
    code: str
    replace: list = field(default_factory=list)
    run: str = ""
    skip: str = ""

    def runnable(self) -> str:
        code = self.run or self.code
        for old, new in self.replace:
            if old not in code:
                raise AssertionError(f"line {self.line}: the marker replaces {old!r}, which the block does not contain")
            code = code.replace(old, new)
        return code


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text`` with the ``readme-test`` markers in the comments right before each."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(```+)\s*([\w+-]*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence[1]) and not lines[j].strip("`"))
        block = Block(line=i + 2, lang=fence[2].lower(), code="\n".join(lines[i + 1:end]) + "\n")
        k = i - 1
        while k >= 0 and lines[k].strip().startswith("<!--"):
            marker = re.fullmatch(r"<!--\s*readme-test:\s*(replace|run|skip):?\s*(.*?)\s*-->", lines[k].strip())
            if marker:
                kind, arg = marker.groups()
                if kind == "replace":
                    old, sep, new = arg.partition(" => ")
                    assert sep, f"line {k + 1}: write 'replace OLD => NEW'"
                    block.replace.insert(0, (old, new))
                elif kind == "run":
                    block.run = arg
                else:
                    assert arg, f"line {k + 1}: a skip marker must say why"
                    block.skip = arg
            k -= 1
        blocks.append(block)
        i = end + 1
    return blocks


def test_the_parser_reads_fences_and_markers():
    text = ("intro\n<!-- readme-test: replace remote=True => remote=\"local\" -->\n```python\nx = f(remote=True)\n```\n"
            "<!-- readme-test: run: lens-plugins \"hi\" -->\n```bash\nlens-plugins PROMPT [--x]\n```\n"
            "<!-- readme-test: skip: recursion -->\n```bash\nmake test\n```\n```\nplain output\n```\n")
    python, synopsis, make, plain = readme_blocks(text)
    assert (python.line, python.lang, python.runnable()) == (4, "python", 'x = f(remote="local")\n')
    assert synopsis.runnable() == 'lens-plugins "hi"' and make.skip == "recursion" and plain.lang == ""


def name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def checked_blocks(path: Path) -> list[Block]:
    """The blocks of ``path``, with the rules above enforced: no unlabelled code, no NDIF without a marker."""
    found = readme_blocks(path.read_text(encoding="utf-8"))
    for block in found:
        if block.skip:
            print(f"{name(path)}:{block.line}: not run: {block.skip}")
        if block.lang in PYTHON and NEEDS_NDIF.search(_code_only(block.code)) and not block.replace and not block.skip:
            raise AssertionError(f"{name(path)}:{block.line}: this block needs NDIF; mark it with e.g. "
                                 "<!-- readme-test: replace remote=True => remote=\"local\" --> (see this test's docstring)")
        if not block.lang and LOOKS_LIKE_CODE.match(block.code) and not block.skip:
            raise AssertionError(f"{name(path)}:{block.line}: an unlabelled block that looks like code: label it "
                                 "```python or ```bash so that it runs (or ```text if it is output)")
    return found


def _runnable(path: Path, langs: set) -> bool:
    return any(b.lang in langs and not b.skip for b in readme_blocks(path.read_text(encoding="utf-8")))


PYTHON_FILES = [path for path in FILES if _runnable(path, PYTHON)]
SHELL_FILES = [path for path in FILES if _runnable(path, SHELL)]


def test_the_readme_and_the_docs_have_runnable_blocks():
    assert README in PYTHON_FILES and README in SHELL_FILES, "the README's quick starts are python and bash blocks"
    assert len(DOCS) >= 10 and {"logit_lens.md", "cli.md", "tuned_lens.md"} <= {p.name for p in PYTHON_FILES + SHELL_FILES}
    for path in FILES:
        checked_blocks(path)  # the labelling and NDIF rules hold on every file, run or not


def _code_only(code: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in code.splitlines())


def _env():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PLOTLY_RENDERER": "json",
           "MPLBACKEND": "Agg", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(README.parent), os.environ.get("PYTHONPATH")]))
    return env


RUNNER = '''
import sys, traceback
blocks = {blocks!r}
namespace = {{"__name__": "__main__"}}
for line, code in blocks:
    try:
        exec(compile("\\n" * (line - 1) + code, {file!r}, "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"{file} block at line {{line}} failed", file=sys.stderr)
        sys.exit(1)
    print(f"{file} block at line {{line}} ran", flush=True)
'''


def heavy_unless_readme(files):
    """The docs pages' blocks are the longest part of the suite (every method on the real model): they run in
    ``make test-heavy``; the README's, the quick starts a user runs first, stay in ``make test``."""
    return [f if f.name == "README.md" else pytest.param(f, marks=pytest.mark.heavy) for f in files]


@pytest.mark.slow
@pytest.mark.parametrize("path", heavy_unless_readme(PYTHON_FILES), ids=name)
def test_python_blocks_run_in_order_in_one_namespace(path, tmp_path):
    python = [(b.line, b.runnable()) for b in checked_blocks(path) if b.lang in PYTHON and not b.skip]
    script = tmp_path / "blocks.py"
    script.write_text(RUNNER.format(blocks=python, file=name(path)), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    assert proc.stdout.count("ran\n") == len(python)


@pytest.mark.slow
@pytest.mark.parametrize("path", heavy_unless_readme(SHELL_FILES), ids=name)
def test_shell_blocks_run(path, tmp_path):
    shell = [b for b in checked_blocks(path) if b.lang in SHELL and not b.skip]
    for block in shell:
        proc = subprocess.run(["bash", "-e", "-c", block.runnable()], cwd=tmp_path, env=_env(), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{name(path)}:{block.line}: {block.runnable()!r} failed:\n{proc.stderr[-3000:]}"
