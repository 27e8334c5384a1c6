#!/usr/bin/env bash
# Training throughput of `lsplit finetune` in-process and over loopback TLS (`lsplit serve
# --training` on 127.0.0.1, `--cloud`), alternated ROUNDS times with the same settings, and the
# payload bytes each way per training token that the client counted. Run by hand after
# `python3 bench/finetune_data.py`; not run by CI. Each cloud run gets a fresh server, so both
# sides start with no dequantized layers cached.
#
#   bench/finetune_bench.sh [LSPLIT] [ROUNDS] [STEPS]
set -euo pipefail
LSPLIT=${1:-target/release/lsplit}
ROUNDS=${2:-2}
STEPS=${3:-4}
DATA=${FINETUNE_DATA:-$HOME/.cache/lambda-split/finetune-data}/domain-train.jsonl
WORK=$(mktemp -d)
trap 'kill "${SERVER:-}" 2>/dev/null || true; rm -rf "$WORK"' EXIT
# Same trunk budgets on both sides: 256 MiB of kept inputs, 1 GiB of dequantized layers.
SETTINGS=(--data "$DATA" --steps "$STEPS" --accumulate 2 --max-len 128 --eval-fraction 0
  --checkpoint-every 0 --seed 0)

"$LSPLIT" cert --out "$WORK/pki" >/dev/null
echo s3cret >"$WORK/token"

tokens_per_s() { sed -n 's/.*; \([0-9.]*\) tokens\/s over.*/\1/p' "$1"; }

for round in $(seq "$ROUNDS"); do
  "$LSPLIT" finetune "${SETTINGS[@]}" --out "$WORK/local" >"$WORK/local.log" 2>"$WORK/local.err" || { cat "$WORK/local.err" >&2; exit 1; }
  echo "round $round in-process: $(tokens_per_s "$WORK/local.log") tokens/s; $(grep "training loss" "$WORK/local.log")"

  "$LSPLIT" serve --listen 127.0.0.1:0 --training \
    --training-budget-mib 256 --training-weights-mib 1024 \
    --cert "$WORK/pki/server.pem" --key "$WORK/pki/server.key" --token-file "$WORK/token" \
    >"$WORK/serve.log" 2>&1 &
  SERVER=$!
  port=
  # The banner may be read half written: wait until it holds the port.
  until [ -n "$port" ]; do
    sleep 0.5
    # (a whole line ends in a newline, which $(...) strips to nothing)
    [ -s "$WORK/serve.log" ] && [ -z "$(tail -c1 "$WORK/serve.log")" ] || continue
    port=$(sed -n 's/^lsplit serve: .* on https:\/\/[^ ]*:\([0-9][0-9]*\)$/\1/p' "$WORK/serve.log")
  done
  "$LSPLIT" finetune "${SETTINGS[@]}" --out "$WORK/cloud" --cloud "https://localhost:$port" \
    --ca "$WORK/pki/ca.pem" --token-file "$WORK/token" >"$WORK/cloud.log" 2>"$WORK/cloud.err" || { cat "$WORK/cloud.err" "$WORK/serve.log" >&2; exit 1; }
  echo "round $round loopback TLS: $(tokens_per_s "$WORK/cloud.log") tokens/s;" \
    "$(grep 'training loss' "$WORK/cloud.log"); $(grep '^payload' "$WORK/cloud.log")"
  kill "$SERVER"
  wait "$SERVER" 2>/dev/null || true
  unset SERVER
  cmp "$WORK/local/adapter_model.safetensors" "$WORK/cloud/adapter_model.safetensors" &&
    echo "round $round: the two adapters are byte-identical"
done
