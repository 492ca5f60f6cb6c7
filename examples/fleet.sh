#!/usr/bin/env bash
# edgeft fleet on one machine: a Flower server and three devices, each holding a disjoint part of the
# maintenance notes (non-IID: split by the state of the equipment), on loopback.
#   host venv (.venv):          tiny model -> bundle
#   device venv (.venv-device): `edgeft fleet server` and three `edgeft fleet client` (no torch)
# Then each device's adapter trained alone for as many steps, for comparison. `make fleet-demo` runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-fleet-out}
HOST=${HOST_VENV:-.venv}
DEVICE=${DEVICE_VENV:-.venv-device}
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-10}
PORT=${PORT:-9092}
DATA=examples/data
rm -rf "$OUT" && mkdir -p "$OUT"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
export OMP_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1

say "1/4 Host: a tiny Llama-style model and its bundle"
"$HOST/bin/python" -m edgeft.host.tiny "$OUT/model" --model-type llama --size tiny
"$HOST/bin/edgeft" export "$OUT/model" --out "$OUT/bundle" --max-seq-len 128
"$HOST/bin/python" - "$DATA/train.jsonl" "$OUT" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for i, states in enumerate([("ok", "worn"), ("failed",), ("noisy",)]):
    mine = [r for r in rows if any(f" is {s}" in json.dumps(r) for s in states)]
    with open(f"{sys.argv[2]}/device-{i}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in mine)
    print(f"device {i}: {len(mine)} samples, states {', '.join(states)}")
PY

say "2/4 Server: $ROUNDS rounds, svd aggregation, waiting for 3 devices on 127.0.0.1:$PORT"
"$DEVICE/bin/edgeft" fleet server "$OUT/bundle" --rounds "$ROUNDS" --min-clients 3 --out "$OUT/server" \
    --address "127.0.0.1:$PORT" --eval-data "$DATA/eval.jsonl" --round-timeout 300 --no-progress &
SERVER=$!
CLIENTS=()
trap 'kill $SERVER "${CLIENTS[@]}" 2>/dev/null || true' EXIT

say "3/4 Devices: each trains $STEPS steps a round on its own part; only the adapter travels"
for i in 0 1 2; do
    "$DEVICE/bin/edgeft" fleet client "$OUT/bundle" --data "$OUT/device-$i.jsonl" --server "127.0.0.1:$PORT" \
        --state-dir "$OUT/device-$i" --name "device-$i" --steps-per-round "$STEPS" --lr 1e-2 --batch-size 8 \
        --threads 1 --idle-timeout 900 &
    CLIENTS+=($!)
done
wait "$SERVER"
wait "${CLIENTS[@]}"
trap - EXIT

say "4/4 Each device alone, $((ROUNDS * STEPS)) steps on its own part, eval on the union"
for i in 0 1 2; do
    "$DEVICE/bin/edgeft" train "$OUT/bundle" --data "$OUT/device-$i.jsonl" --out "$OUT/alone-$i" \
        --max-steps $((ROUNDS * STEPS)) --lr 1e-2 --batch-size 8 --threads 1 --no-progress >/dev/null
    printf 'device-%s alone: ' "$i"
    "$DEVICE/bin/edgeft" eval "$OUT/bundle" --data "$DATA/eval.jsonl" --adapter "$OUT/alone-$i/adapter"
done
printf '\nfleet, round %s: ' "$ROUNDS"
"$DEVICE/bin/edgeft" eval "$OUT/bundle" --data "$DATA/eval.jsonl" --adapter "$(printf '%s/server/round-%03d/adapter' "$OUT" "$ROUNDS")"
