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


def make_tiny_model(model_type: str, out_dir: Path, size: str = "tiny", seed: int = 0, vocab_size: int = 512) -> Path:
    """A random-weight causal LM of ``model_type`` saved as a Hugging Face model directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    train_tokenizer(out_dir, vocab_size=vocab_size)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    ids = {name: tok.token_to_id(name) for name in ("<s>", "</s>", "<pad>")}
    config = AutoConfig.for_model(
        model_type,
        vocab_size=tok.get_vocab_size(),
        max_position_embeddings=1024,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=(model_type == "qwen2"),  # exercise tied embeddings on one type
        initializer_range=0.1,  # wider than 0.02 so a frozen random head can express sharp predictions
        **SIZES[size],
    )
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
    parser.add_argument("--model-type", default="llama", choices=["llama", "mistral", "qwen2", "phi3"])
    parser.add_argument("--size", default="demo", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_tiny_model(args.model_type, args.out, size=args.size, seed=args.seed)
    print(f"tiny {args.model_type} model ({args.size}) written to {args.out}")


if __name__ == "__main__":
    main()
