"""Tiny randomly initialised Hugging Face causal LMs, built offline from their config classes.

Each family is one entry: ``(config class name, config kwargs)``. Weights come from a fixed seed; the
vocabulary is 1000 ids, which the SmolLM2 tokenizer decodes (its first 1000 ids are ordinary tokens).
"""

import torch
import transformers

VOCAB = 1000

COMMON = dict(vocab_size=VOCAB)

FAMILIES = {
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=3, n_head=4, n_positions=128)),
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  tie_word_embeddings=False)),
}


def tiny_model(family: str, seed: int = 0):
    config_class, kwargs = FAMILIES[family]
    config = getattr(transformers, config_class)(**COMMON, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random init leaves norms at weight 1 / bias 0, which would hide a lens that skips them.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name:
                param.add_(torch.randn_like(param) * 0.2)
    return model.eval()


def random_tokens(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=generator)
