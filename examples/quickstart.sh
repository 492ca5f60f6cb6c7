#!/usr/bin/env bash
# edgeft end to end on an embedded tiny model: build -> export (host) -> eval, train, eval (device).
# Nothing is downloaded: the model has random weights and its tokenizer is trained on examples/data.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo-out}
DATA=examples/data
rm -rf "$OUT" && mkdir -p "$OUT"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

say "1/6 Build a tiny Llama-style model (2 layers, hidden 128, random weights, BPE tokenizer trained on $DATA/corpus.txt)"
run python -m edgeft.host.tiny "$OUT/model" --model-type llama --size demo

say "2/6 Host: export it with a LoRA adapter (r=8 on all attention projections) to an ONNX Runtime training bundle"
run edgeft export "$OUT/model" --out "$OUT/bundle" --lora-r 8 --lora-alpha 16 --max-seq-len 128
ls -la "$OUT/bundle"

say "3/6 Device: eval loss of the untrained adapter on held-out maintenance notes"
run edgeft eval "$OUT/bundle" --data "$DATA/eval.jsonl"

say "4/6 Device: fine-tune the adapter on $DATA/train.jsonl (text, prompt/completion and chat samples)"
run edgeft train "$OUT/bundle" --data "$DATA/train.jsonl" --eval-data "$DATA/eval.jsonl" --out "$OUT/run" \
    --max-steps 400 --lr 5e-3 --warmup-steps 10 --batch-size 8 --save-every 100
python - "$OUT/run/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
losses = s["losses"]
print("training loss by step:")
for step in [1, *range(40, len(losses) + 1, 40)]:
    print(f"  step {step:4d}  loss {losses[step - 1]:.3f}  " + "#" * int(losses[step - 1] * 8))
print(f"eval loss: {s['eval_loss_before']:.3f} before -> {s['eval_loss']:.3f} after "
      f"({s['tokens_per_second']:.0f} tokens/s, peak RSS {s['peak_rss_mb']:.0f} MB)")
PY

say "5/6 Device: the trained adapter (PEFT format) evaluated on its own"
ls -la "$OUT/run/adapter"
run edgeft eval "$OUT/bundle" --data "$DATA/eval.jsonl" --adapter "$OUT/run/adapter"
say "6/6 Device: answer with the base model, then with the trained adapter (greedy, KV cache, same session kind as edgeft serve)"
Q="Station pine hill: valve is failed. What should the crew do?"  # a station/part pair not in the training data
run edgeft generate "$OUT/bundle" --prompt "$Q" --max-new-tokens 24
run edgeft generate "$OUT/bundle" --prompt "$Q" --max-new-tokens 24 --adapter "$OUT/run/adapter"
printf '\nDone. Bundle: %s/bundle  Adapter: %s/run/adapter\n' "$OUT" "$OUT"
