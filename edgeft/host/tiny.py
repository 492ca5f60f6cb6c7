"""Tiny Hugging Face models built locally: random weights from a config plus a tokenizer trained
on bundled text. Used by the demo and the tests, so nothing is ever downloaded."""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = Path(__file__).resolve().parents[2] / "examples" / "data" / "corpus.txt"

# Shapes per model type: small enough for a 2-core CI box, with grouped-query attention.
SIZES = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "demo": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "small": dict(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4
    ),
}


# What the checkpoints people fine-tune for devices carry (issue #12), scaled down so that short
# test sequences cross every window and rope switch point: windows of 16 tokens and rope
# switches at 32, where the tests run 40 and more. ``make_tiny_model(..., features=True)``.
_LONGROPE_SHORT = [1.0, 1.05, 1.1, 1.2, 1.3, 1.5]  # one factor per rotary frequency (12 rotary dims)
_LONGROPE_LONG = [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]
FEATURES = {
    # Llama-3.2-1B/3B: llama3 rope scaling (wavelengths between 8 and 32 tokens smoothed, longer ones / 8).
    "llama": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    ),
    # Mistral-7B-v0.1: one sliding window on every layer.
    "mistral": dict(sliding_window=16),
    # Qwen2/2.5: qkv biases (always), tied embeddings, and use_sliding_window with max_window_layers:
    # layer 0 full attention, layer 1 a 16-token window.
    "qwen2": dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=16, max_window_layers=1),
    # Phi-3.5/4-mini: longrope short/long factors switching past 32 tokens, partial rotary (3/4 of
    # the head); Phi-3's sliding window on every layer.
    "phi3": dict(
        rope_scaling={"type": "longrope", "short_factor": _LONGROPE_SHORT, "long_factor": _LONGROPE_LONG},
        original_max_position_embeddings=32,
        partial_rotary_factor=0.75,
        sliding_window=16,
    ),
    # Qwen3-0.6B/1.7B: per-head q/k RMSNorm, head_dim wider than hidden / heads, tied embeddings;
    # yarn rope scaling as Qwen3's long-context recipe adds it.
    "qwen3": dict(
        head_dim=32,
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 32},
    ),
    # Gemma-3-1B/4B: sliding (16 tokens, local rope) and global (linearly scaled rope) layers
    # interleaved, (1 + w) and sandwich norms, embeddings scaled by sqrt(hidden), a query scalar other
    # than head_dim, gelu-tanh, tied embeddings; attention and final logit soft-capping (Gemma-2's,
    # null in Gemma-3 configs) so that code path is exercised too.
    "gemma3_text": dict(
        head_dim=32,
        query_pre_attn_scalar=24,
        sliding_window=16,
        sliding_window_pattern=2,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
}
MODEL_TYPES = tuple(FEATURES)


def train_tokenizer(out_dir: Path, vocab_size: int = 512, corpus: Path = CORPUS, model_max_length: int = 512) -> None:
    """Byte-level BPE trained on ``corpus``; writes tokenizer.json and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus)], trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHATML,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def make_tiny_model(
    model_type: str, out_dir: Path, size: str = "tiny", seed: int = 0, vocab_size: int = 512, features: bool = False
) -> Path:
    """A random-weight causal LM of ``model_type`` saved as a Hugging Face model directory;
    ``features``: with its family's rope scaling, windows and norms (``FEATURES``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    train_tokenizer(out_dir, vocab_size=vocab_size)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    ids = {name: tok.token_to_id(name) for name in ("<s>", "</s>", "<pad>")}
    options = dict(
        vocab_size=tok.get_vocab_size(),
        max_position_embeddings=1024,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=(model_type == "qwen2"),  # exercise tied embeddings on one type
        initializer_range=0.1,  # wider than 0.02 so a frozen random head can express sharp predictions
        **SIZES[size],
    )
    if features:
        options.update(FEATURES[model_type])
    config = AutoConfig.for_model(model_type, **options)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _randomize_norms(model, seed)
    # Chat turns end with <|im_end|>: generation stops there as well as at </s>.
    model.generation_config.eos_token_id = [ids["</s>"], tok.token_to_id("<|im_end|>")]
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _randomize_norms(model, seed: int) -> None:
    """Norm weights start at exactly 1.0; perturb them so parity tests see distinct tensors."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build a tiny random-weight model directory (no download).")
    parser.add_argument("out", type=Path)
    parser.add_argument("--model-type", default="llama", choices=MODEL_TYPES)
    parser.add_argument("--size", default="demo", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", action="store_true", help="the family's rope scaling, windows, norms (FEATURES)")
    args = parser.parse_args()
    make_tiny_model(args.model_type, args.out, size=args.size, seed=args.seed, features=args.features)
    print(f"tiny {args.model_type} model ({args.size}) written to {args.out}")


if __name__ == "__main__":
    main()
