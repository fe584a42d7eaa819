"""The README's gallery (issue 30): ``docs/gallery.py`` renders each figure of the default model in the system's
Chromium, every image the README shows is one it renders, and each rendering is a drawn figure of the same
size as the committed copy (a figure that stops drawing, or changes its layout, shows here; pixels are not
compared, since fonts and anti-aliasing differ between machines)."""

import importlib.util
import io
import os
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _gallery():
    spec = importlib.util.spec_from_file_location("gallery", ROOT / "docs" / "gallery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_shows_exactly_the_gallery():
    shown = re.findall(r"!\[[^\]]*\]\(docs/images/([^)]+)\)", (ROOT / "README.md").read_text(encoding="utf-8"))
    assert sorted(shown) == sorted(_gallery().GALLERY) == sorted(p.name for p in (ROOT / "docs" / "images").glob("*.png"))


def test_every_gallery_figure_renders(tmp_path):
    from PIL import Image

    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        if os.environ.get("LENS_PLUGINS_REQUIRE_BROWSER"):
            raise FileNotFoundError("no chromium on PATH: run `make browser`")
        pytest.skip("no chromium on PATH (make browser installs Debian's)")
    written = _gallery().render(tmp_path)
    assert sorted(p.name for p in written) == sorted(_gallery().GALLERY)
    for path in written:
        image = Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
        committed = Image.open(ROOT / "docs" / "images" / path.name)
        assert image.size == committed.size, (path.name, image.size, committed.size)
        colours = image.getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 50, (path.name, len(colours))  # a blank image has a few
        grey = image.convert("L").histogram()
        white = grey[255] / sum(grey)
        assert white < 0.99, (path.name, white)  # something was drawn (a blank page is ~1.0; a line chart ~0.96)
