"""Device stage: loss and perplexity of a bundle (optionally with an adapter) on JSONL data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeft.bundle import Bundle
from edgeft.device.data import Example, load_examples, make_batches
from edgeft.errors import EdgeftError
from edgeft.tasks import Task

if TYPE_CHECKING:
    import numpy as np

    from edgeft.device.runtime import LoraGraphs


@dataclass
class EvalConfig:
    bundle: Path
    data: Path
    adapter: Path | None = None
    batch_size: int = 8
    max_seq_len: int | None = None
    truncate: bool = False
    threads: int | None = None
    profile: str | None = None
    trusted_key: Path | None = None  # public key the bundle must be signed by (default: env EDGEFT_TRUSTED_KEY)


def evaluate(cfg: EvalConfig) -> dict:
    """``{"loss": mean over loss-bearing tokens, "perplexity": exp(loss), "tokens": count}``;
    classification bundles: their metrics (``edgeft.device.classify.evaluate_classifier``)."""
    from edgeft.device.adapter import load_adapter
    from edgeft.device.runtime import LoraGraphs, graph_session
    from edgeft.device.tokenizer import BundleTokenizer
    from edgeft.profiles import runtime_settings

    if cfg.batch_size < 1:
        raise EdgeftError("--batch-size must be at least 1")
    bundle = Bundle.open(cfg.bundle, trusted_key=cfg.trusted_key)
    if Task.of(bundle.manifest).is_classification:
        from edgeft.device.classify import evaluate_classifier

        return evaluate_classifier(cfg, bundle)
    tok = BundleTokenizer.from_dir(bundle.root)
    examples = load_examples(cfg.data, tok, bundle.seq_len(cfg.max_seq_len), truncate=cfg.truncate)
    adapter = cfg.adapter or bundle.path(bundle.manifest["lora"]["init_adapter"])
    settings = runtime_settings(cfg.profile, "train", cfg.threads)  # eval runs where training runs
    model = LoraGraphs(bundle, graph_session(settings.provider, settings.threads))
    loss, tokens = mean_loss(model, load_adapter(adapter, bundle), examples, cfg.batch_size, tok.pad_token_id)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}


def mean_loss(
    model: LoraGraphs,
    lora: dict[str, np.ndarray],
    examples: list[Example],
    batch_size: int,
    pad_token_id: int,
    collate=None,
) -> tuple[float, int]:
    """Token-weighted mean loss (per labelled item for classification): each batch returns its
    summed loss (denominator 1). ``collate``: the bundle task's batch maker (default causal-lm)."""
    total, tokens = 0.0, 0
    extra = {"collate": collate} if collate is not None else {}
    for batch in make_batches(examples, batch_size, pad_token_id, seed=0, epoch=0, **extra):
        total += model.loss(lora, batch, 1.0)
        tokens += batch.num_loss_tokens
    return total / tokens, tokens
