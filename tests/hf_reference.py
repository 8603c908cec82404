"""Tiny random Hugging Face models, built inside tests as the independent reference.

Every supported family is built with transformers' own PyTorch classes, with norm weights
and biases perturbed away from their constant init so a wrong norm offset or a dropped bias
cannot go unnoticed.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 101

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Family -> config overrides. Together they cover MHA/GQA/MQA, head_dim != hidden/heads,
# q/k/v and o biases, q/k norms (per head and full), sliding windows (all layers, alternating,
# patterned), soft-capping, llama3 and yarn RoPE, tied and untied embeddings.
FAMILIES: dict[str, dict] = {
    "llama": dict(
        attention_bias=True,
        mlp_bias=True,
        rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
        },
    ),
    "mistral": dict(sliding_window=5, num_key_value_heads=4),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=24),
    "gemma": dict(head_dim=32, num_key_value_heads=1),
    "gemma2": dict(
        head_dim=32, sliding_window=5, query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
    ),
    "olmo2": dict(),
    "olmo3": dict(
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_scaling={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
            "beta_fast": 32, "beta_slow": 1,
        },
    ),
    # Gemma-3: local/global layers with their own RoPE (linear-scaled global), per-head q/k
    # norms with the (1 + w) offset, sandwich norms, query_pre_attn_scalar, tied head.
    "gemma3_text": dict(
        head_dim=32, sliding_window=5, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ),
    # SmolLM3: the middle layer has no RoPE (HF's no_rope_layers: 1 = uses RoPE).
    "smollm3": dict(no_rope_layers=[1, 0, 1]),
    # Phi-3/Phi-4-mini: fused qkv/gate_up, RoPE on the first 3/4 of each head, longrope whose
    # original length (16) the 13-token parity batch stays under and generation runs past,
    # and a window on every layer.
    "phi3": dict(
        sliding_window=5, original_max_position_embeddings=16,
        rope_parameters={
            "rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.75,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
        },
    ),
}


def tiny_hf_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny random transformers causal LM of `family`, in eval mode, float32."""
    torch.manual_seed(seed)
    kwargs = {**_COMMON, **FAMILIES[family], **overrides}
    config = transformers.AutoConfig.for_model(family, **kwargs)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def save_tiny(model: transformers.PreTrainedModel, directory, **kwargs) -> str:
    """Saves a tiny model as safetensors (tokenizer-less) and returns the directory."""
    model.save_pretrained(str(directory), safe_serialization=True, **kwargs)
    return str(directory)


# A ChatML-style template, so chat formatting and the prefilling attack can be tested
# on tiny models exactly as on real instruct models.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer over VOCAB=101 ids ('<pad>'=0, '<s>'=1, '</s>'=2, 97
    characters and '<unk>'=100), with a chat template, so tiny models can read real text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t", "<unk>"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars[:98])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join back without spaces
    out = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    out.chat_template = TINY_CHAT_TEMPLATE
    return out


def save_tiny_with_tokenizer(model: transformers.PreTrainedModel, directory) -> str:
    """Saves a tiny model plus `tiny_tokenizer()` (with chat template); returns the directory."""
    save_tiny(model, directory)
    tiny_tokenizer().save_pretrained(str(directory))
    return str(directory)


def left_padded_batch(seed: int = 0, batch: int = 3, length: int = 13):
    """Random ids with rows left-padded by 0, 4 and 9 tokens: (ids, mask, positions)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (batch, length))
    mask = np.ones((batch, length), np.int64)
    for row, pad in zip(range(batch), (0, 4, 9)):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    return ids, mask, positions


def torch_logits(model, ids, mask, positions) -> np.ndarray:
    """Reference logits from transformers' PyTorch forward with explicit positions."""
    with torch.no_grad():
        out = model(
            torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        )
    return out.logits.float().numpy()


def hf_greedy(hf_model, inputs, max_new_tokens, eos=None, pad=0, every_step=False):
    """transformers' greedy generate on left-padded inputs: the new tokens per row (pads after
    EOS). `every_step` forbids an early stop (min_new_tokens), so every step is compared."""
    length = max(map(len, inputs))
    ids = np.full((len(inputs), length), pad, np.int64)
    mask = np.zeros_like(ids)
    for i, seq in enumerate(inputs):
        ids[i, length - len(seq):], mask[i, length - len(seq):] = seq, 1
    extra = {"min_new_tokens": max_new_tokens, "use_cache": True} if every_step else {}
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=eos, pad_token_id=pad, **extra,
        )
    return out[:, length:].numpy()
