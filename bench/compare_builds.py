"""Several builds of lsplit on the same measures, alternated: what each engine change bought.

Purpose: the "prediction next to measured result" table of BENCHMARKS.md for engine changes.
Not run by CI. Build each commit to compare and keep its binary, then, from the repository root:

    git worktree add /tmp/at-COMMIT COMMIT
    CARGO_TARGET_DIR=target cargo build --release -p lsplit --manifest-path /tmp/at-COMMIT/Cargo.toml
    cp target/release/lsplit /tmp/lsplit-COMMIT
    python3 bench/compare_builds.py /tmp/lsplit-A /tmp/lsplit-B ... [--threads 1] [--runs 3]

Each measure of each build runs in a process of its own (`lsplit bench --only unsplit --runs 1
--warmup --json`, the default model unless `--model`), builds take turns measure by measure, and
the table shows medians and each build's ratio to the first. Measures: decode of 128 tokens from
position 10, decode of 64 tokens from position 1000, prefill of 256 tokens, and peak RSS.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

MEASURES = [
    # label, prompt tokens, decode tokens, rate key
    ("decode 128 from position 10 (tok/s)", 10, 128, "decode_median"),
    ("decode 64 from position 1000 (tok/s)", 1000, 64, "decode_median"),
    ("prefill 256 tokens (tok/s)", 256, 1, "prefill_median"),
]


def measure(binary: str, model: str | None, prompt: int, decode: int, threads: int) -> dict:
    """One run of one build: its JSON result."""
    command = [binary, "bench", "--only", "unsplit", "--runs", "1", "--warmup", "--json",
               "--prompt-tokens", str(prompt), "--decode-tokens", str(decode)]
    if model:
        command += ["--model", model]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["unsplit"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binaries", nargs="+", help="lsplit binaries, the baseline first")
    parser.add_argument("--model", help="GGUF file [default: lsplit's default model]")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    rates = {(m[0], b): [] for m in MEASURES for b in args.binaries}
    for run in range(args.runs):
        for label, prompt, decode, key in MEASURES:
            for binary in args.binaries:
                result = measure(binary, args.model, prompt, decode, args.threads)
                rates[(label, binary)].append(result[key])
                print(f"run {run + 1} {label} {binary}: {result[key]:.1f}", file=sys.stderr)
    # Peak RSS in a process per build, so that one build's peak does not hide another's.
    rss = {}
    for binary in args.binaries:
        peak = subprocess.run(
            ["/usr/bin/time", "-f", "%M", binary, "bench", "--only", "unsplit", "--runs", "1",
             "--prompt-tokens", "1000", "--decode-tokens", "16", "--json"]
            + (["--model", args.model] if args.model else []),
            env=dict(os.environ, RAYON_NUM_THREADS=str(args.threads)),
            check=True, capture_output=True, text=True).stderr.strip().splitlines()[-1]
        rss[binary] = int(peak) / 1024

    load = os.getloadavg()[0]
    print(f"{args.runs} runs, {args.threads} thread(s), medians; load average {load:.1f} at the end.\n")
    names = [os.path.basename(b) for b in args.binaries]
    print("| measure | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    base = args.binaries[0]
    for label, *_ in MEASURES:
        cells = []
        for binary in args.binaries:
            value = statistics.median(rates[(label, binary)])
            ratio = value / statistics.median(rates[(label, base)])
            cells.append(f"{value:.1f} ({ratio:.2f}x)")
        print(f"| {label} | " + " | ".join(cells) + " |")
    cells = [f"{rss[b]:.0f} ({rss[b] / rss[base]:.2f}x)" for b in args.binaries]
    print("| peak RSS, 1000-token prompt (MiB) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
