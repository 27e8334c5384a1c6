#!/usr/bin/env bash
# Issue 22's checks on a GPU machine, in one command; every result goes to one folder.
#
#   scripts/gpu-check.sh DIST OUT        e.g. scripts/gpu-check.sh dist/lsplit-cuda "$OUT"
#
# DIST is what scripts/build-cuda.sh wrote (lsplit or lsplit.xz, run.sh), plus, for the models:
#   - tokenizer.gguf: SmolLM2's tokenizer keys (bench/make_synthetic_gguf.py --tokenizer-only),
#     from which the synthetic 1.1B-shape Q4_0 and 7B-shape Q4_K_M models are generated here
#     (python3 with numpy and the `gguf` package, whose wheel sits in DIST/wheels);
#   - SmolLM2-135M-Instruct.Q4_1.gguf, or its pieces SmolLM2.part-* with SmolLM2.sha256: pieces
#     in DIST-smollm2 or already in the work folder ($LSPLIT_GPU_WORK, default /tmp/lsplit-gpu;
#     earlier calls may leave pieces there when one copy cannot carry them all). Without them
#     the SmolLM2 steps are skipped and the summary says so.
# Steps (each under its own timeout; a failed step is recorded and the next one runs):
#   1. nvidia-smi, and the binary's view of the GPU (`lsplit inspect --device cuda`);
#   2. correctness against the CPU trunk on the same file: greedy tokens over the 24 built-in
#      prompts, agreement %, largest logit difference, batched against solo on the GPU, for
#      SmolLM2 (trained) and the 1.1B shape (random weights);
#   3. aggregate trunk steps/s with 1, 16, 64 and 256 sessions on the GPU, 1.1B-shape Q4_0
#      and 7B-shape Q4_K_M; the same on 2 CPU cores (the 2-core CPU trunk of the targets);
#   4. one device's decode tok/s over loopback with the GPU trunk (`lsplit serve --device
#      cuda` and `lsplit bench`-like timing through `lsplit generate --stats`).
# Planned for about 8 minutes on an H200 with 16 cores.
set -u

dist=$(cd "${1:?usage: gpu-check.sh DIST OUT}" && pwd)
out=${2:?usage: gpu-check.sh DIST OUT}
mkdir -p "$out"
out=$(cd "$out" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
work=${LSPLIT_GPU_WORK:-/tmp/lsplit-gpu}
mkdir -p "$work"
summary=$out/summary.txt
: >"$summary"

# Runs one step under a timeout: `step NAME SECONDS COMMAND...`; its output goes to
# OUT/NAME.log, its exit status and duration to the summary.
step() {
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - started)) s" | tee -a "$summary"
    return $rc
}

# 1. The machine and the GPU as lsplit sees it.
step machine 30 bash -c 'nvidia-smi; uname -a; nproc; free -g' || true
if [ ! -f "$dist/lsplit" ] && [ -f "$dist/lsplit.xz" ]; then
    xz -dkc "$dist/lsplit.xz" >"$work/lsplit" && cp "$dist/run.sh" "$work/run.sh"
    dist_bin=$work
else
    dist_bin=$dist
fi
chmod +x "$dist_bin/lsplit" "$dist_bin/run.sh"
lsplit=("$dist_bin/run.sh")
step version 30 "${lsplit[@]}" --version || true

# 2. The models.
smol=$work/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$dist/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
    smol=$dist/SmolLM2-135M-Instruct.Q4_1.gguf
else
    # Pieces carried now (DIST-smollm2) or by earlier calls (copied to the work folder).
    cp "$dist-smollm2"/SmolLM2.part-* "$work"/ 2>/dev/null
    if compgen -G "$work/SmolLM2.part-*" >/dev/null; then
        cat "$work"/SmolLM2.part-* >"$smol.partial"
        if [ "$(sha256sum <"$smol.partial" | cut -d' ' -f1)" = "$(cat "$dist/SmolLM2.sha256")" ]; then
            mv "$smol.partial" "$smol"
        else
            echo "SmolLM2: pieces incomplete ($(ls "$work"/SmolLM2.part-* | wc -l) there)" >>"$summary"
        fi
    fi
fi
if [ -f "$smol" ]; then
    echo "SmolLM2: $smol ($(sha256sum "$smol" | cut -c1-16))" >>"$summary"
else
    echo "SmolLM2: not carried; its checks are skipped" | tee -a "$summary"
fi
tokenizer=$dist/tokenizer.gguf
[ -f "$tokenizer" ] || tokenizer=$smol
export PYTHONPATH=$(printf '%s:' "$dist"/wheels/*.whl)${PYTHONPATH:-}
make_model=(python3 "$here/bench/make_synthetic_gguf.py" --tokenizer-from "$tokenizer"
    --out-dir "$work")
# The 1.1B shape from quantized normal weights (its logits mean something to compare); the 7B
# shape from random blocks (speed only; quantizing 7B weights in numpy would take minutes).
step make-1.1b-q4_0 240 "${make_model[@]}" --shape 1.1b --type q4_0 || true
step make-7b-q4_k_m 180 "${make_model[@]}" --shape 7b --type q4_k_m --random-blocks || true
tiny=$work/tinyllama-1.1b-shape-random.q4_0.gguf
big=$work/llama-7b-shape-random.blocks.q4_k_m.gguf

# 3. Correctness against the CPU trunk (and batched against solo on the GPU).
if [ -f "$smol" ]; then
    step check-smollm2 150 "${lsplit[@]}" trunk-check --model "$smol" --device cuda \
        --prompts 24 --tokens 32 --batch-sessions 16 --batch-steps 8 --json || true
fi
if [ -f "$tiny" ]; then
    step check-1.1b 150 "${lsplit[@]}" trunk-check --model "$tiny" --device cuda \
        --prompts 24 --tokens 16 --batch-sessions 16 --batch-steps 8 --json || true
fi

# 4. Aggregate trunk steps/s: the GPU at 1, 16, 64 and 256 sessions; two CPU cores for the
#    ratio (fewer sessions: a 2-core step of 256 sessions takes seconds).
for model in "$tiny" "$big"; do
    [ -f "$model" ] || continue
    name=$(basename "$model" .gguf)
    step "speed-gpu-$name" 150 "${lsplit[@]}" trunk-check --model "$model" --device cuda \
        --prompts 0 --batch-sessions 0 --sessions 1,16,64,256 --context 16 --steps 16 --json || true
    step "speed-cpu2-$name" 120 env RAYON_NUM_THREADS=2 taskset -c 0,1 "${lsplit[@]}" \
        trunk-check --model "$model" --device cpu --prompts 0 --batch-sessions 0 \
        --sessions 1,16 --context 16 --steps 4 --json || true
done

# 5. One device's decode over loopback with the GPU trunk.
if [ -f "$smol" ]; then
    "${lsplit[@]}" serve --model "$smol" --device cuda --insecure --listen 127.0.0.1:50071 \
        >"$out/serve.log" 2>&1 &
    server=$!
    for _ in $(seq 60); do
        grep -q "on http" "$out/serve.log" && break
        kill -0 "$server" 2>/dev/null || break
        sleep 1
    done
    step loopback 120 "${lsplit[@]}" generate --model "$smol" --cloud http://127.0.0.1:50071 \
        --insecure --max-tokens 128 --temperature 0 --stats \
        "Write a story about a lighthouse keeper." || true
    kill "$server" 2>/dev/null
    wait "$server" 2>/dev/null
fi
echo "done; results in $out" | tee -a "$summary"
