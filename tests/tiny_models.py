"""Tiny randomly initialised Hugging Face causal LMs, built offline from their config classes.

Each family is one entry: ``(config class name, config kwargs)``. Weights come from a fixed seed; the
vocabulary is 1000 ids, which the SmolLM2 tokenizer decodes (its first 1000 ids are ordinary tokens).
Every family of ``lens_plugins.core.architectures.ARCHITECTURES`` has an entry here, so the architecture
tests cover the whole table.
"""

import torch
import transformers

VOCAB = 1000

COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)

_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)

FAMILIES = {
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=3, n_head=4, n_positions=128)),
    "gpt_neo": ("GPTNeoConfig", dict(hidden_size=64, num_layers=3, num_heads=4, max_position_embeddings=128,
                                     attention_types=[[["global", "local"], 1], [["global"], 1]], window_size=4)),
    "gptj": ("GPTJConfig", dict(n_embd=64, n_layer=3, n_head=4, n_positions=128, rotary_dim=8)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4, max_position_embeddings=128)),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                              max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=1)),
    "bloom": ("BloomConfig", dict(hidden_size=64, n_layer=3, n_head=4)),
    # Llama takes optional attention and MLP biases: on here, so a rotary family has an attention output bias.
    "llama": ("LlamaConfig", dict(_LLAMA_LIKE, attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", dict(_LLAMA_LIKE, sliding_window=None)),
    "mixtral": ("MixtralConfig", dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", dict(_LLAMA_LIKE)),
    "qwen3": ("Qwen3Config", dict(_LLAMA_LIKE, head_dim=16)),
    "gemma": ("GemmaConfig", dict(_LLAMA_LIKE, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(_LLAMA_LIKE, head_dim=16, final_logit_softcapping=3.0,
                                    query_pre_attn_scalar=16)),
    "gemma3_text": ("Gemma3TextConfig", dict(_LLAMA_LIKE, head_dim=16, final_logit_softcapping=3.0,
                                             query_pre_attn_scalar=16, sliding_window=4)),
    "phi3": ("Phi3Config", dict(_LLAMA_LIKE, pad_token_id=0)),
    "olmo2": ("Olmo2Config", dict(_LLAMA_LIKE)),
}


# Biases a family only has as an option, turned on above. TransformerLens 3.9's HookedTransformer conversion
# cannot load them (lens_plugins refuses a biased Llama there), so its tests ask for the family without.
OPTIONAL_BIASES = {"llama": dict(attention_bias=False, mlp_bias=False)}


def tiny_model(family: str, seed: int = 0, optional_biases: bool = True):
    config_class, kwargs = FAMILIES[family]
    if not optional_biases:
        kwargs = {**kwargs, **OPTIONAL_BIASES.get(family, {})}
    config = getattr(transformers, config_class)(**COMMON, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random init leaves norms at weight 1 / bias 0 (Gemma: 0 for its 1 + w) and every linear bias at 0, which
    # would hide a lens that skips a norm or forgets Gemma's + 1, a forgotten lm_head bias (GPT-J), and an
    # attribution that drops the attention output bias or an MLP bias. Perturb every norm parameter and every
    # bias the family has (attention q/k/v/out, MLP, lm_head), from a generator of their own so the draw is
    # fixed by the seed alone.
    generator = torch.Generator().manual_seed(seed + 10_000)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def random_tokens(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=generator)
