"""Tiny randomly initialised vision-language models with their processors, built offline.

Each family is a language model of 2 layers (width 64) under a vision tower of 2 layers (width 32) on 32 x 32
pictures of 8 x 8 patches, seeded, with every norm parameter and bias perturbed (as ``tiny_models`` does, so a
skipped norm or a dropped bias shows). The tokenizer is SmolLM2's (the embedded default model's files) with the
family's image tokens added; the processor is the family's own class, built from that tokenizer and its image
processor made with small sizes, so the prompt is expanded (and the image featurised) exactly as the real
processor does. Nothing is fetched. ``picture()`` is a real image drawn with PIL.
"""

import torch
import transformers as T
from PIL import Image, ImageDraw

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=False)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3]}

# family -> the prompt's text (with the processor's image placeholder) and the model class
FAMILIES = {
    "llava": ("<image>\nThe picture shows a red", "LlavaForConditionalGeneration"),
    "llava_next": ("<image>\nThe picture shows a red", "LlavaNextForConditionalGeneration"),
    "gemma3": ("<start_of_image> The picture shows a red", "Gemma3ForConditionalGeneration"),
    "paligemma": ("The picture shows a red", "PaliGemmaForConditionalGeneration"),
    "qwen2_vl": ("<|vision_start|><|image_pad|><|vision_end|>The picture shows a red", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("<|vision_start|><|image_pad|><|vision_end|>The picture shows a red",
                   "Qwen2_5_VLForConditionalGeneration"),
    "idefics3": ("<image>The picture shows a red", "Idefics3ForConditionalGeneration"),
}
# Families a TransformerLens 4.3 TransformerBridge has an adapter for.
BRIDGE_FAMILIES = ("llava", "llava_next", "gemma3", "qwen2_5_vl", "idefics3")


def picture(width: int = 48, height: int = 40) -> Image.Image:
    """A real RGB image: a red square and a blue disc on white."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([4, 4, 22, 30], fill=(220, 30, 30))
    draw.ellipse([26, 8, 44, 34], fill=(30, 60, 220))
    return image


def tokenizer_with(tokens):
    from lens_plugins.models import default_model_dir

    tokenizer = T.AutoTokenizer.from_pretrained(default_model_dir())
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)})
    return tokenizer


class QwenProcessor:
    """What ``Qwen2VLProcessor`` does for an image, for a machine without torchvision (which its video
    processor, built with it, requires): featurise the image, then expand ``<|image_pad|>`` to one token per
    ``merge_size x merge_size`` patches of ``image_grid_thw``."""

    def __init__(self, image_processor, tokenizer):
        self.image_processor, self.tokenizer = image_processor, tokenizer

    def __call__(self, text, images, return_tensors="pt"):
        features = self.image_processor(images=images, return_tensors=return_tensors)
        n = int(features["image_grid_thw"][0].prod()) // self.image_processor.merge_size ** 2
        encoded = self.tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors=return_tensors)
        image_token = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        kinds = (encoded["input_ids"] == image_token).long()  # 1: an image token (M-RoPE positions)
        return T.BatchFeature({**encoded, "mm_token_type_ids": kinds, **features})


def processor_and_config(family):
    ids = lambda tok, *names: [tok.convert_tokens_to_ids(n) for n in names]
    if family in ("llava", "llava_next"):
        tok = tokenizer_with(["<image>"])
        text = T.LlamaConfig(vocab_size=len(tok), **TEXT)
        if family == "llava":
            image = T.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
            processor = T.LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=8,
                                         vision_feature_select_strategy="default", num_additional_image_tokens=1)
            config = T.LlavaConfig(text_config=text, vision_config=T.CLIPVisionConfig(**VISION),
                                   image_token_id=ids(tok, "<image>")[0], vision_feature_layer=-1)
        else:
            pinpoints = [[32, 32], [32, 64], [64, 32]]
            image = T.LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=pinpoints)
            processor = T.LlavaNextProcessor(image_processor=image, tokenizer=tok, patch_size=8,
                                             vision_feature_select_strategy="default", num_additional_image_tokens=1)
            config = T.LlavaNextConfig(text_config=text, vision_config=T.CLIPVisionConfig(**VISION),
                                       image_token_id=ids(tok, "<image>")[0], vision_feature_layer=-1,
                                       image_grid_pinpoints=pinpoints)
    elif family == "gemma3":
        tok = tokenizer_with(["<start_of_image>", "<end_of_image>", "<image_soft_token>"])
        tok.boi_token, tok.eoi_token, tok.image_token = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
        boi, eoi, soft = ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
        tok.boi_token_id, tok.eoi_token_id, tok.image_token_id = boi, eoi, soft
        image = T.Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
        processor = T.Gemma3Processor(image_processor=image, tokenizer=tok, image_seq_length=4)
        text = T.Gemma3TextConfig(vocab_size=len(tok), **TEXT, head_dim=16, sliding_window=4, query_pre_attn_scalar=16)
        config = T.Gemma3Config(text_config=text, vision_config=T.SiglipVisionConfig(**VISION), mm_tokens_per_image=4,
                                image_token_id=soft, boi_token_id=boi, eoi_token_id=eoi)
    elif family == "paligemma":
        tok = tokenizer_with(["<image>"])
        image = T.SiglipImageProcessorPil(size={"height": 32, "width": 32})
        image.image_seq_length = 16
        processor = T.PaliGemmaProcessor(image_processor=image, tokenizer=tok)
        text = T.GemmaConfig(vocab_size=len(tok), **TEXT, head_dim=16)
        config = T.PaliGemmaConfig(text_config=text, vision_config=T.SiglipVisionConfig(**VISION, projection_dim=64),
                                   image_token_id=ids(tok, "<image>")[0], projection_dim=64)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        tok = tokenizer_with(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"])
        image = T.Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                           size={"shortest_edge": 32 * 32, "longest_edge": 48 * 48})
        pad, start, end, video = ids(tok, "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
        text = dict(vocab_size=len(tok), **TEXT, rope_parameters=dict(MROPE), bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id)
        if family == "qwen2_vl":
            processor = QwenProcessor(image, tok)
            vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                          temporal_patch_size=2)
            config = T.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=pad, video_token_id=video,
                                     vision_start_token_id=start, vision_end_token_id=end)
        else:
            processor = QwenProcessor(image, tok)
            vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=8,
                          spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
            config = T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=pad,
                                        video_token_id=video, vision_start_token_id=start, vision_end_token_id=end)
    elif family == "idefics3":
        tok = tokenizer_with(["<fake_token_around_image>", "<image>", "<global-img>"])
        image = T.Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
        processor = T.Idefics3Processor(image_processor=image, tokenizer=tok, image_seq_len=4)
        text = T.LlamaConfig(vocab_size=len(tok), **TEXT)
        config = T.Idefics3Config(text_config=text, vision_config=T.Idefics3VisionConfig(**VISION),
                                  image_token_id=ids(tok, "<image>")[0], scale_factor=2)
    else:
        raise KeyError(family)
    config.architectures = [FAMILIES[family][1]]
    for sub in (config.get_text_config(),):
        sub.bos_token_id, sub.eos_token_id = tok.bos_token_id, tok.eos_token_id
    return processor, config


def tiny_vlm(family, seed=0):
    """``(model, processor)``: the family's tiny model (eval mode, eager attention) and its processor."""
    processor, config = processor_and_config(family)
    torch.manual_seed(seed)
    model = getattr(T, FAMILIES[family][1])._from_config(config, attn_implementation="eager")
    generator = torch.Generator().manual_seed(seed + 10_000)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias") or not param.any():
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval(), processor


def inputs_for(family, processor, image=None):
    """The processor's output for the family's prompt and ``picture()``."""
    return processor(text=FAMILIES[family][0], images=image if image is not None else picture(), return_tensors="pt")
