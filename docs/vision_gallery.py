"""Render the image-patch figure of ``docs/vision_language.md`` (``docs/vision_figures/vision_patches.png``): the lens of a
tiny random LLaVA-style model (``tests/tiny_vlms.py``: 2 layers, SmolLM2's tokenizer, random weights, built offline)
over a picture drawn with PIL, by the system's Chromium as ``docs/gallery.py`` renders the README's gallery.

    python docs/vision_gallery.py [OUT_DIR]        # default docs/vision_figures

Not in ``docs/images``: that folder holds exactly the README's gallery (``tests/test_docs_gallery.py``), and the docs
site's build test copies the pages without it.

The weights are random, so the tokens in the cells mean nothing: the figure shows the layout (the picture, its
patch grid at one lens row with a slider over the rows, the text positions beside it), not a finding.
"""

import shutil
import sys
from pathlib import Path

NAME = "vision_patches.png"


def figure():
    """The figure, computed on the tiny LLaVA."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_vlms import inputs_for, picture, tiny_vlm

    import lens_plugins as lp
    from lens_plugins.plot.vision import image_lens_figure

    model, processor = tiny_vlm("llava")
    inputs = inputs_for("llava", processor)
    nn_model = lp.nnsight.wrap_model(model, processor.tokenizer, processor)
    grids = lp.vision.image_grids(model, inputs)
    result = lp.vision.label_image_tokens(lp.nnsight.run_logit_lens(nn_model, inputs), grids)
    return image_lens_figure(result, grids, metric="entropy", row=-1, image=picture())


def render(out: Path, executable: str = "") -> Path:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    executable = executable or shutil.which("chromium") or shutil.which("chromium-browser") or ""
    if not executable:
        raise FileNotFoundError("no chromium on PATH: run `make browser` (apt-get install chromium)")
    html = out / (NAME + ".html")
    figure().write_html(html, include_plotlyjs=True, config={"displayModeBar": False})
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 800}, device_scale_factor=1)
        page.goto(html.resolve().as_uri())
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 1", timeout=60_000)
        page.locator(".js-plotly-plot").first.screenshot(path=str(out / NAME))
        browser.close()
    html.unlink()
    return out / NAME


if __name__ == "__main__":
    print(render(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "vision_figures"))
