"""A vision-language model on the local NDIF server: a tiny random LLaVA (``tests/tiny_vlms.py``) saved to a
local directory with its processor, loaded by the server from that directory, lensed on a PIL picture with the
processor's ``pixel_values`` in the request; remote equals local bit for bit, and the patch grid is labelled."""

import pytest
from helpers import assert_identical
from tiny_vlms import inputs_for, tiny_vlm

import lens_plugins as lp


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    model, processor = tiny_vlm("llava")
    path = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path), processor


def test_remote_vision_language_lens_equals_local(ndif, vlm_dir):
    path, processor = vlm_dir
    model = lp.nnsight.remote_model(path, task="image-text-to-text")
    inputs = inputs_for("llava", processor)
    remote = lp.nnsight.run_logit_lens(model, inputs, remote=True, top_k=3)
    local = lp.nnsight.run_logit_lens(model, inputs, top_k=3)  # loads the weights here now
    assert_identical(vars(remote), vars(local))
    grids = lp.vision.image_grids(model, inputs)
    assert [(g.rows, g.cols) for g in grids] == [(4, 4)]
    assert lp.vision.label_image_tokens(remote, grids).str_tokens(0)[grids[0].positions[5]] == "<image 1,1>"
