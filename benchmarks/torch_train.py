"""The torch + PEFT equivalent of ``edgeft train`` for the CLI row and the eval-loss check: the same
model, initial adapter, tokenizer, batches (edgeft's own data code), learning-rate schedule, clip
and AdamW, in eager fp32 with transformers' sdpa attention.

    python benchmarks/torch_train.py --model DIR --adapter DIR --data FILE --eval-data FILE --max-steps N --out FILE

Prints nothing but errors; writes a summary like edgeft's summary.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.set_threads()


def main() -> None:
    args = parse()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgeft.device.data import load_examples, make_batches
    from edgeft.device.optim import linear_schedule
    from edgeft.device.tokenizer import BundleTokenizer

    torch.set_num_threads(common.THREADS)
    tok = BundleTokenizer.from_dir(args.model)
    train = load_examples(args.data, tok, common.MAX_SEQ_LEN)
    evals = load_examples(args.eval_data, tok, common.MAX_SEQ_LEN)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    model = PeftModel.from_pretrained(base, args.adapter, is_trainable=True)
    params = [t for t in model.parameters() if t.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    before = mean_loss(model, evals, args.batch_size, tok.pad_token_id)
    t0, losses, epoch, batches = time.perf_counter(), [], 0, []
    for step in range(args.max_steps):
        if not batches:  # the next epoch, in edgeft's order
            batches = make_batches(train, args.batch_size, tok.pad_token_id, args.seed, epoch)
            epoch += 1
        b = batches.pop(0)
        for group in opt.param_groups:
            group["lr"] = linear_schedule(step, args.lr, 0, args.max_steps)
        opt.zero_grad(set_to_none=True)
        loss = summed_loss(model, b) / b.num_loss_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    after = mean_loss(model, evals, args.batch_size, tok.pad_token_id)
    summary = {"steps": args.max_steps, "eval_loss_before": before, "eval_loss": after, "seconds": seconds}
    summary.update(losses=losses, peak_rss_mb=common.vm_hwm_mb())
    Path(args.out).write_text(json.dumps(summary) + "\n")


def summed_loss(model, batch):
    """Sum of the token cross-entropies of the labelled positions (edgeft's loss x its denominator)."""
    import torch

    ids, mask, labels = (torch.from_numpy(a) for a in (batch.input_ids, batch.attention_mask, batch.labels))
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def mean_loss(model, examples, batch_size: int, pad: int) -> float:
    """Token-weighted mean eval loss, over edgeft's eval batches (edgeft.device.evaluate.mean_loss)."""
    import torch

    from edgeft.device.data import make_batches

    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in make_batches(examples, batch_size, pad, seed=0, epoch=0):
            total += float(summed_loss(model, b))
            tokens += b.num_loss_tokens
    return total / tokens if tokens else math.nan


def parse():
    p = argparse.ArgumentParser()
    for name in ("--model", "--adapter", "--data", "--eval-data", "--out"):
        p.add_argument(name, required=True, type=Path)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


if __name__ == "__main__":
    main()
