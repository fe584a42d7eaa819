"""The docs site (issue 30): ``mkdocs build --strict`` passes (broken links between pages, unknown anchors and
missing API objects fail it), a page not yet in the nav does not fail it, the API reference renders the public
entry points, and the README stays a short front page whose links and images exist."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]' (make docs does)")
pytest.importorskip("mkdocstrings")

# The public entry points the API page must render (issue 30: at least these), by their anchor on the page.
API = [
    "lens_plugins.backends.transformer_lens.run_logit_lens", "lens_plugins.backends.transformer_lens.logit_lens",
    "lens_plugins.backends.transformer_lens.hook_filter", "lens_plugins.backends.transformer_lens.run_attribution",
    "lens_plugins.backends.nnsight.run_logit_lens", "lens_plugins.backends.nnsight.logit_lens",
    "lens_plugins.backends.nnsight.logit_lens_result", "lens_plugins.backends.nnsight.remote_model",
    "lens_plugins.lenses.tuned.TunedLens", "lens_plugins.decoder.Decoder", "lens_plugins.methods.evaluate.evaluate_lenses",
    "lens_plugins.plot.figures.html_report", "lens_plugins.methods.report.run_report",
]


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={"NO_MKDOCS_2_WARNING": "1",
                                                                                    "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    proc = build(ROOT / "mkdocs.yml", site)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "WARNING" not in proc.stderr, proc.stderr
    return site


def test_every_nav_page_is_built(site):
    nav = re.findall(r":\s*([\w/]+)\.md\s*$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE)
    assert len(nav) >= 15 and {p.stem for p in (ROOT / "docs").glob("*.md")} >= set(nav)
    for page in nav:
        assert (site / ("" if page == "index" else page) / "index.html").exists(), page


def test_the_api_reference_renders_the_entry_points(site):
    page = (site / "api" / "index.html").read_text(encoding="utf-8")
    missing = [name for name in API if f'id="{name}"' not in page]
    assert missing == [], missing
    for section in ("Parameters:", "Returns:", "Raises:"):  # Google-style sections, rendered as tables
        assert section in page, section


def test_a_broken_link_fails_and_a_page_outside_the_nav_does_not(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs, ignore=shutil.ignore_patterns("images", "*.py"))
    (docs / "not_in_nav_yet.md").write_text("# A page another branch adds before its nav line\n\nSee [Install](install.md).\n")
    config = (ROOT / "mkdocs.yml").read_text().replace("docs_dir: docs", f"docs_dir: {docs}")
    config = config.replace("paths: [.]", f"paths: [{ROOT}]")
    (tmp_path / "mkdocs.yml").write_text(config)
    proc = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0 and (tmp_path / "site" / "not_in_nav_yet" / "index.html").exists(), proc.stderr[-3000:]
    (docs / "not_in_nav_yet.md").write_text("# Broken\n\nSee [nowhere](no_such_page.md).\n")
    proc = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0 and "no_such_page.md" in proc.stderr, proc.stderr[-3000:]


def test_the_readme_is_a_short_front_page_whose_links_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert len(targets) >= 15
    assert [t for t in targets if not t.startswith("http") and not (ROOT / t).exists()] == []
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert 4 <= len(images) <= 6 and all(image.startswith("docs/images/") for image in images)
    linked = {Path(t).name for t in targets if t.startswith("docs/") and t.endswith(".md")}
    assert linked >= {"install.md", "logit_lens.md", "cli.md", "api.md", "development.md", "numerics.md"}
