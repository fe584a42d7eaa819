"""Vision-language models: where the image's tokens sit in the prompt, and their patch grid.

An image-text-to-text model (LLaVA, Gemma 3, Qwen2-VL, Idefics3 / SmolVLM, PaliGemma ...) runs its language
model over one sequence in which each image is a run of placeholder tokens (the config's ``image_token_id``)
whose embeddings the vision tower's features replace. The lens reads and decodes that language model exactly as
a text model's (rows, decoder and verification are the same; the image reaches it through the processor's
``pixel_values``), so what is specific to images is only the labelling: which positions are image patches, and
where each sits in its image. ``image_grids`` finds each image's run and its grid (rows x columns of patches,
row-major as the vision tower flattens them): from ``image_grid_thw`` (Qwen2-VL / Qwen2.5-VL, whose runs are
merged ``spatial_merge_size`` x ``spatial_merge_size`` patches); LLaVA-Next's any-resolution run as its base
grid (the whole picture at the tower's size) then its detail grid (the tiles, unpadded to the picture's aspect,
each row ending in a newline token, found from ``image_sizes``); else a square run (LLaVA, Gemma 3's pooled
tokens, PaliGemma, each Idefics3 tile). A run that is none of these keeps its order without a grid. ``label_image_tokens`` names every patch position
``<image r,c>`` (``<image i: r,c>`` with several images or tiles) on a ``LensResult`` or ``AttentionResult``,
for every table and figure; ``lens_plugins.plot.vision`` draws the lens over the grid.

Mllama is the exception the labels cannot cover: it attends to the image by cross-attention, so no position of
its sequence is a patch (its language model is still lensed as a text model).
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lens_plugins.core.errors import LensValueError

# Config fields naming the image placeholder token, newest name first.
IMAGE_TOKEN_FIELDS = ("image_token_id", "image_token_index")


@dataclass
class ImageGrid:
    """One image's run of placeholder tokens in prompt ``batch``: its sequence ``positions`` (in the order
    the vision tower emitted its features) and, where known, the patch grid: ``positions[r * cols + c]`` is
    the patch in row ``r``, column ``c`` (``rows`` / ``cols`` ``None``: no grid, the run is labelled in order)."""

    batch: int
    image: int
    positions: list[int]
    rows: int | None = None
    cols: int | None = None
    part: str = ""  # "base" / "detail" for LLaVA-Next's two grids of one image
    newline: bool = False  # the last column is the row-end token (LLaVA-Next's detail grid)

    def label(self, index: int, several: bool) -> str:
        """The label of the ``index``-th token of the run: ``<image r,c>`` (``<image i: r,c>`` when the prompt
        holds several runs, ``<image i detail: r,c>`` for a part, ``c`` = ``↵`` for a row end),
        ``<image i: k>`` without a grid."""
        if self.cols:
            column = index % self.cols
            where = f"{index // self.cols},{'↵' if self.newline and column == self.cols - 1 else column}"
        else:
            where = str(index)
        name = f"{self.image} {self.part}" if self.part else str(self.image)
        prefix = f"{name}: " if several or self.part or not self.cols else ""
        return f"<image {prefix}{where}>"


def image_token_id(model) -> int:
    """The image placeholder id of a vision-language model (HF, nnsight or a TransformerBridge around one)."""
    config = config_of(model)  # under an nnsight envoy or a TransformerBridge (``original_model``)
    for field in IMAGE_TOKEN_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int):
            return value
    raise LensValueError(f"{type(config).__name__} has no image token id ({' or '.join(IMAGE_TOKEN_FIELDS)}): "
                         "it is not an image-text-to-text model whose images are tokens of the prompt")


def merge_size(model) -> int:
    """Qwen2-VL's ``spatial_merge_size`` (patches merged per side into one token; 1 for other families)."""
    vision = getattr(config_of(model), "vision_config", None)
    return int(getattr(vision, "spatial_merge_size", 1) or 1)


def config_of(model):
    hf = getattr(model, "_module", model)
    return getattr(getattr(hf, "original_model", hf), "config", None)


def any_resolution(config, positions: list[int], batch: int, image: int, size) -> list[ImageGrid] | None:
    """LLaVA-Next's run (``image_grid_pinpoints`` in the config): the base grid, then the detail rows of
    ``cols`` patches and a newline token each, the shape found as the model finds it from the picture's
    ``size`` = ``(height, width)`` (``image_sizes``); ``None`` if the run does not split so."""
    vision = getattr(config, "vision_config", None)
    if not getattr(config, "image_grid_pinpoints", None) or vision is None or size is None:
        return None
    side = int(vision.image_size) // int(vision.patch_size)
    rest = len(positions) - side * side
    if rest <= 0:
        return None
    # the model's own arithmetic: tiles of the best pinpoint, then the padding cut back to the picture's aspect
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    tiles_h, tiles_w = get_anyres_image_grid_shape(tuple(size), config.image_grid_pinpoints, int(vision.image_size))
    rows, cols = unpad_image(torch.empty(1, tiles_h * side, tiles_w * side), torch.tensor(size)).shape[1:]
    if rows * (cols + 1) != rest:
        return None
    base, detail = positions[:side * side], positions[side * side:]
    return [ImageGrid(batch, image, base, side, side, "base"),
            ImageGrid(batch, image, detail, rows, cols + 1, "detail", newline=True)]


def runs(ids: Tensor, token: int) -> list[list[int]]:
    """The maximal runs of consecutive positions of ``ids`` (1-d) equal to ``token``."""
    found: list[list[int]] = []
    for position in (ids == token).nonzero().flatten().tolist():
        if found and found[-1][-1] == position - 1:
            found[-1].append(position)
        else:
            found.append([position])
    return found


def image_grids(model, inputs) -> list[ImageGrid]:
    """Every image run of every prompt in ``inputs`` (a processor's output, or ``input_ids`` alone) with its
    patch grid; ``image_grid_thw`` (Qwen2-VL) gives the grids, else a square run is its own grid.

    Raises ``LensValueError`` when the prompts hold no image token (the image did not reach the prompt: pass
    the processor's output, whose text it expanded) or when ``image_grid_thw`` does not match the runs."""
    ids = inputs if isinstance(inputs, Tensor) else inputs["input_ids"]
    ids = ids.reshape(-1, ids.shape[-1]).cpu()
    thw = None if isinstance(inputs, Tensor) else inputs.get("image_grid_thw")
    sizes = None if isinstance(inputs, Tensor) else inputs.get("image_sizes")
    sizes = [] if sizes is None else [tuple(int(v) for v in size) for size in sizes.tolist()]
    config = config_of(model)
    token = image_token_id(model)
    merge = merge_size(model)
    grids, shapes = [], [] if thw is None else [tuple(int(v) for v in row) for row in thw.tolist()]
    for batch in range(ids.shape[0]):
        for image, positions in enumerate(runs(ids[batch], token)):
            rows = cols = None
            if thw is not None:
                if not shapes:
                    raise LensValueError(f"image_grid_thw names {len(thw)} images, but the prompts hold more image "
                                         "runs: pass the inputs the processor made together")
                t, h, w = shapes.pop(0)
                rows, cols = t * h // merge, w // merge
                if rows * cols != len(positions):
                    raise LensValueError(f"image {image} of prompt {batch} is {len(positions)} tokens, but "
                                         f"image_grid_thw says {t}x{h}x{w} patches merged {merge}x{merge}")
            elif getattr(config, "image_grid_pinpoints", None):
                split = any_resolution(config, positions, batch, image, sizes.pop(0) if sizes else None)
                if split is not None:
                    grids.extend(split)
                    continue
            elif math.isqrt(len(positions)) ** 2 == len(positions):
                rows = cols = math.isqrt(len(positions))
            grids.append(ImageGrid(batch, image, positions, rows, cols))
    if not grids:
        raise LensValueError(f"the prompts hold no image token (id {token}): pass the processor's output, e.g. "
                             "processor(text=..., images=..., return_tensors='pt'), whose text has the image's "
                             "placeholder tokens expanded")
    return grids


def token_labels(result, grids: list[ImageGrid]) -> list[list[str]]:
    """Per prompt and position, the result's token strings with every image position named by its patch."""
    labels = [result.str_tokens(b) for b in range(result.token_ids.shape[0])]
    for grid in grids:
        several = sum(g.batch == grid.batch for g in grids) > 1
        for index, position in enumerate(grid.positions):
            labels[grid.batch][position] = grid.label(index, several)
    return labels


def label_image_tokens(result, grids: list[ImageGrid]):
    """``result`` (a ``LensResult``, ``AttentionResult`` ...) with its image positions labelled ``<image r,c>``
    (``token_labels``), so every table, DataFrame and figure names the patch, not the placeholder token."""
    for grid in grids:
        if grid.batch >= result.token_ids.shape[0] or max(grid.positions) >= result.token_ids.shape[1]:
            raise LensValueError(f"image {grid.image} of prompt {grid.batch} lies outside this result's "
                                 f"{tuple(result.token_ids.shape)} tokens: use the grids of the inputs it ran")
    return dataclasses.replace(result, token_labels=token_labels(dataclasses.replace(result, token_labels=None), grids))


def patch_values(values: Tensor, result_positions: list[int], grid: ImageGrid) -> Tensor:
    """``values [..., pos]`` (over the result's decoded ``result_positions``) arranged as the grid
    ``[..., rows, cols]``, NaN for a patch whose position was not decoded."""
    where = {p: i for i, p in enumerate(result_positions)}
    rows, cols = (grid.rows, grid.cols) if grid.cols else (1, len(grid.positions))
    out = torch.full((*values.shape[:-1], rows * cols), math.nan)
    for index, position in enumerate(grid.positions):
        if position in where:
            out[..., index] = values[..., where[position]].float()
    return out.reshape(*values.shape[:-1], rows, cols)


__all__ = [
    "IMAGE_TOKEN_FIELDS",
    "ImageGrid",
    "any_resolution",
    "config_of",
    "image_grids",
    "image_token_id",
    "label_image_tokens",
    "merge_size",
    "patch_values",
    "runs",
    "token_labels",
]
