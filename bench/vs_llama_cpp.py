"""lsplit against llama.cpp: the same GGUF files, the same thread count, side by side.

Purpose: the benchmark of issue 7 ("Engine speed: at or beyond llama.cpp"). Not run by CI; run it
by hand on a quiet machine, from the repository root:

    python3 bench/vs_llama_cpp.py

(defaults: `--models smollm2,tiny-q4_0,tiny-q8_0 --runs 5 --threads 2 --local-layers 2
--kv-cache f16`). It
prints a Markdown table, ready for BENCHMARKS.md, on stdout and its progress on stderr.

Set-up, all cached and reused:
- a virtual environment (default ~/.cache/lambda-split/llama-venv, `--venv`) with
  llama-cpp-python==0.3.36, compiled from PyPI's source with CMAKE_ARGS=-DGGML_NATIVE=ON, and the
  `gguf` package; installed only when missing;
- `cargo build --release -p lsplit` (skipped when `--lsplit PATH` names a binary);
- the models: `smollm2` is SmolLM2-135M-Instruct Q4_1 (`lsplit fetch`); `tiny-q4_0` and
  `tiny-q8_0` are synthetic models of TinyLlama-1.1B's shape with random weights, written by
  `bench/make_synthetic_gguf.py` into ~/.cache/lambda-split/synthetic on first use (random
  weights are fine for speed); `tiny-q4_k_m`, `tiny-q5_k_m` and `tiny-q6_k` are `tiny-q8_0`
  requantized by llama.cpp's own quantizer (`bench/requantize_gguf.py`), next to it: the K-quant
  mixes people download. `7b-q4_k_m` is the same for Llama-2-7B's shape (`7b-q8_0`, 7.2 GB, is
  written first, once; the Q4_K_M file is about 4 GB; decode there is bound by memory
  bandwidth), and the `small-` models (five layers of width 256) check the set-up in seconds. A
  path to any other GGUF file works too. LSPLIT_CACHE_DIR moves ~/.cache/lambda-split, as it
  does for lsplit.

What it measures, for each model and each engine (llama.cpp, lsplit unsplit, lsplit split with
`-n` local layers at each end, the trunk in-process):
- decode tokens/s for 128 greedy tokens after a 10-token prompt (positions 10..137);
- decode tokens/s for 64 greedy tokens after a 1000-token prompt (positions 1000..1063);
- prefill tokens/s of a 256-token prompt;
- the peak resident memory (RSS) of the engine's processes;
- split against unsplit in one process (`lsplit bench --runs 2 --warmup --json`, both loaded, the
  two taking turns: unsplit, split, split, unsplit), once per run and measure: the median of
  those processes' ratios. Separate processes show how each engine runs alone, but on a noisy
  machine their split/unsplit ratio swings by more than the split costs (0.83x-1.28x in one
  run, the same kernels on both sides); turns in one process see the same machine state.
  `--no-paired` leaves it out.
`--measures` picks some of the three (e.g. `short,prefill` for a quicker run).
Each measure of each engine runs in a process of its own (llama.cpp: `bench/llama_cpp_worker.py`;
lsplit: `lsplit bench --runs 1 --only unsplit|split --warmup --json`), which first passes one token
through the model untimed. The engines take turns, measure by measure, `--runs` times, and the
table shows medians and the ratios lsplit/llama.cpp. Both engines build their prompts from the
same English text (the one in `lsplit bench`), tokenized by their own tokenizers without BOS and
repeated to the same number of tokens. llama.cpp runs with n_threads = n_threads_batch =
`--threads`, n_batch 512, n_ctx 2048 and llama-cpp-python's other defaults (memory-mapped weights,
flash attention off) and so its default f16 KV cache; lsplit runs with RAYON_NUM_THREADS =
`--threads`, the lossless f32 codec and, unless `--kv-cache` says otherwise, an f16 KV cache
too (`lsplit --kv-cache f32` is the exact path; both are worth recording). llama.cpp's peak RSS is shown less that of its Python process before the model is loaded.

With the defaults it takes about half an hour on a 2-core machine (about 2.6 minutes per run of
each 1.1B-shape model, a third of it the one-process measure; 39 minutes for five of them at
three runs), plus the first set-up. Nothing else should run: with
more runnable threads than cores, both engines slow down erratically (llama.cpp's threads spin at
every barrier), so the table records the load average when the measures began.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
CACHE = Path(os.environ.get("LSPLIT_CACHE_DIR", Path.home() / ".cache" / "lambda-split"))
LLAMA_CPP_VERSION = "0.3.36"
CONTEXT = 2048
# Model name prefix -> the --shape of bench/make_synthetic_gguf.py and a label.
SHAPES = {"tiny": ("1.1b", "1.1B shape"), "7b": ("7b", "7B shape"),
          "small": ("small", "small test shape")}
# Written by bench/make_synthetic_gguf.py.
SYNTHETIC = {"q4_0": "Q4_0", "q8_0": "Q8_0"}
# Made from the Q8_0 synthetic of the same shape by llama.cpp's quantizer
# (bench/requantize_gguf.py), as people make theirs.
REQUANTIZED = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
MODEL_LABELS = {"smollm2": "SmolLM2-135M-Instruct Q4_1"} | {
    f"{prefix}-{qtype}": f"{label} (random) {type_label}"
    for prefix, (_, label) in SHAPES.items()
    for qtype, type_label in (SYNTHETIC | REQUANTIZED).items()
}
ENGINES = ["llama.cpp", "unsplit", "split"]


@dataclass(frozen=True)
class Measure:
    """One timed workload: a prompt of `prompt_tokens`, then `decode_tokens` greedy tokens."""

    prompt_tokens: int
    decode_tokens: int
    rate: str  # which rate the measure reports: "prefill" or "decode"

    @property
    def label(self) -> str:
        if self.rate == "prefill":
            return f"prefill {self.prompt_tokens} tokens (tok/s)"
        return f"decode {self.decode_tokens} tokens from position {self.prompt_tokens} (tok/s)"


SHORT = Measure(prompt_tokens=10, decode_tokens=128, rate="decode")
LONG = Measure(prompt_tokens=1000, decode_tokens=64, rate="decode")
PREFILL = Measure(prompt_tokens=256, decode_tokens=0, rate="prefill")
MEASURES = {"short": SHORT, "long": LONG, "prefill": PREFILL}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_venv(venv: Path) -> Path:
    """The venv's Python, with llama-cpp-python and gguf installed (only when missing)."""
    python = venv / "bin" / "python"
    if not python.exists():
        log(f"creating the virtual environment {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    check = f"import gguf, llama_cpp; assert llama_cpp.__version__ == '{LLAMA_CPP_VERSION}'"
    if subprocess.run([python, "-c", check], capture_output=True).returncode != 0:
        package = f"llama-cpp-python=={LLAMA_CPP_VERSION}"
        log(f"installing {package} and gguf into {venv} (compiles llama.cpp: minutes)")
        env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON")
        subprocess.run([python, "-m", "pip", "install", "--no-cache-dir", package, "gguf"],
                       check=True, env=env)
    return python


def last_line(command: list, **kwargs) -> str:
    """Runs `command` (stderr passes through) and returns the last line of its stdout."""
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, **kwargs).stdout
    return out.strip().splitlines()[-1]


def resolve_models(names: list[str], lsplit: Path, python: Path) -> dict[str, Path]:
    """Model name (or path) -> GGUF path, fetching or generating the models as needed."""
    smollm2 = Path(last_line([lsplit, "fetch"]))
    def synthetic(shape: str, qtype: str) -> Path:
        return Path(last_line([python, BENCH / "make_synthetic_gguf.py",
                               "--tokenizer-from", smollm2, "--type", qtype, "--shape", shape,
                               "--out-dir", CACHE / "synthetic"]))

    models = {}
    for name in names:
        prefix, _, qtype = name.partition("-")
        shape = SHAPES.get(prefix, (None,))[0]
        if name == "smollm2":
            models[name] = smollm2
        elif shape and qtype in SYNTHETIC:
            models[name] = synthetic(shape, qtype)
        elif shape and qtype in REQUANTIZED:
            models[name] = Path(last_line([python, BENCH / "requantize_gguf.py",
                                           "--from", synthetic(shape, "q8_0"),
                                           "--type", qtype]))
        elif Path(name).is_file():
            models[name] = Path(name)
        else:
            raise SystemExit(f"unknown model {name!r}: give one of {', '.join(MODEL_LABELS)} "
                             "or a path to a GGUF file")
    return models


def run_measured(command: list, env: dict | None = None) -> tuple[str, int]:
    """Runs `command`; returns the last line of its stdout and its peak RSS in KiB."""
    with tempfile.TemporaryFile(mode="w+") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True,
                                   env=env)
        out = process.stdout.read()
        process.stdout.close()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"{' '.join(map(str, command))} failed "
                             f"({process.returncode}):\n{errors.read()}")
    return out.strip().splitlines()[-1], usage.ru_maxrss


def run_engine(engine: str, model: Path, measure: Measure, args, python: Path,
               lsplit: Path) -> tuple[float, float]:
    """One measure of one engine, in a process of its own: (tokens/s, peak RSS in MiB)."""
    if engine == "llama.cpp":
        line, rss = run_measured([python, BENCH / "llama_cpp_worker.py", "--model", model,
                                  "--threads", str(args.threads), "--context", str(CONTEXT),
                                  "--prompt-tokens", str(measure.prompt_tokens),
                                  "--decode-tokens", str(measure.decode_tokens)])
        result = json.loads(line)
        return result[measure.rate], (rss - result["baseline_rss_kib"]) / 1024
    line, rss = lsplit_bench(lsplit, model, measure, args, "--runs", "1", "--only", engine)
    return json.loads(line)[engine][f"{measure.rate}_median"], rss / 1024


def lsplit_bench(lsplit: Path, model: Path, measure: Measure, args,
                 *runs: str) -> tuple[str, int]:
    """`lsplit bench --json` of one measure on `args.threads` threads, with `runs` (its turns
    and columns): its JSON line and peak RSS in KiB."""
    return run_measured(
        [lsplit, "bench", "--model", model, "-n", str(args.local_layers),
         "--prompt-tokens", str(measure.prompt_tokens),
         "--decode-tokens", str(measure.decode_tokens),
         *runs, "--warmup", "--json", "--kv-cache", args.kv_cache],
        env=dict(os.environ, RAYON_NUM_THREADS=str(args.threads)),
    )


def run_paired(model: Path, measure: Measure, args, lsplit: Path) -> float:
    """Split / unsplit of one measure in one lsplit process, the two taking turns twice."""
    line, _ = lsplit_bench(lsplit, model, measure, args, "--runs", "2")
    result = json.loads(line)
    key = f"{measure.rate}_median"
    return result["split"][key] / result["unsplit"][key]


def benchmark(name: str, model: Path, args, python: Path, lsplit: Path) -> dict:
    """Rates per (measure label, engine), peak RSS per engine and the paired split / unsplit
    ratio per measure label, over all runs."""
    rates = {(m.label, e): [] for m in args.measures for e in ENGINES}
    peak = dict.fromkeys(ENGINES, 0.0)
    paired = {m.label: [] for m in args.measures}
    for run in range(args.runs):
        for measure in args.measures:
            order = ENGINES[run % len(ENGINES):] + ENGINES[:run % len(ENGINES)]
            for engine in order:
                rate, rss = run_engine(engine, model, measure, args, python, lsplit)
                rates[measure.label, engine].append(rate)
                peak[engine] = max(peak[engine], rss)
                log(f"{name} run {run + 1}/{args.runs}: {measure.label}: {engine} {rate:.1f}, "
                    f"peak RSS {rss:.0f} MiB")
            if args.paired:
                paired[measure.label].append(run_paired(model, measure, args, lsplit))
                log(f"{name} run {run + 1}/{args.runs}: {measure.label}: split / unsplit in one "
                    f"process {paired[measure.label][-1]:.3f}")
    return {"rates": {key: statistics.median(v) for key, v in rates.items()}, "peak": peak,
            "paired": {key: statistics.median(v) for key, v in paired.items() if v}}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
    return (f"{cpu}, {os.cpu_count()} cores, {mem_kib / 2**20:.0f} GiB RAM, "
            f"Linux {platform.release()}")


def lsplit_version() -> str:
    return subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                          capture_output=True, text=True).stdout.strip() or "unknown"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def table(results: dict, models: dict[str, Path], args, command: str, minutes: float,
          load: float) -> str:
    split = f"split -n {args.local_layers}"
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f"Machine: {machine()}; load average {load:.2f} when the measures began. "
        f"Date: {now:%Y-%m-%d %H:%M} UTC.",
        "",
        f"Command: `{command}` ({minutes:.0f} minutes). lsplit {lsplit_version()}, "
        f"llama-cpp-python {LLAMA_CPP_VERSION} (GGML_NATIVE), {args.threads} threads each; "
        f"medians of {args.runs} runs, engines alternated, each in its own process.",
        "",
        f"| model | measure | llama.cpp | lsplit unsplit | lsplit {split} | unsplit / llama.cpp "
        f"| split / llama.cpp | split / unsplit | split / unsplit, one process |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, result in results.items():
        label = MODEL_LABELS.get(name, models[name].name)
        rates = result["rates"]
        for measure in args.measures:
            llama, whole, parts = (rates[measure.label, e] for e in ENGINES)
            together = result["paired"].get(measure.label)
            lines.append(f"| {label} | {measure.label} | {llama:.1f} | {whole:.1f} | {parts:.1f} "
                         f"| {ratio(whole, llama)} | {ratio(parts, llama)} "
                         f"| {ratio(parts, whole)} "
                         f"| {'' if together is None else f'{together:.2f}x'} |")
        if LONG in args.measures and SHORT in args.measures:
            llama, whole, parts = (ratio(rates[LONG.label, e], rates[SHORT.label, e])
                                   for e in ENGINES)
            lines.append(f"| {label} | decode from position {LONG.prompt_tokens} / from "
                         f"position {SHORT.prompt_tokens} | {llama} | {whole} | {parts} "
                         "| | | | |")
        llama, whole, parts = (result["peak"][e] for e in ENGINES)
        lines.append(f"| {label} | peak RSS (MiB) | {llama:.0f} | {whole:.0f} | {parts:.0f} "
                     f"| {ratio(whole, llama)} | {ratio(parts, llama)} | {ratio(parts, whole)} | |")
    lines += [
        "",
        "llama.cpp: n_threads = n_threads_batch, n_batch 512, n_ctx 2048, memory-mapped weights, "
        "flash attention off (llama-cpp-python's default); its peak RSS excludes the Python "
        "process's RSS before the model was loaded; its KV cache is f16 (its default). lsplit: "
        f"{args.kv_cache} KV cache, f32 codec, trunk in-process. "
        + ("Split / unsplit, one process: the median over runs of one lsplit process's ratio, "
           "both loaded, taking turns (unsplit, split, split, unsplit). " if args.paired else "")
        + "Prompts: the same English text, tokenized by each engine, no BOS. The 1.1B-shape models "
        "have random weights (bench/make_synthetic_gguf.py): fine for speed.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,tiny-q4_0,tiny-q8_0",
                        help=f"comma-separated names ({', '.join(MODEL_LABELS)}) or GGUF paths "
                        "[default: %(default)s]")
    parser.add_argument("--measures", default="short,long,prefill",
                        help="comma-separated measures: short (decode from position 10), long "
                        "(decode from position 1000), prefill [default: %(default)s]")
    parser.add_argument("--runs", type=int, default=5,
                        help="runs of each measure; medians are reported [default: 5]")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads of both engines [default: 2]")
    parser.add_argument("--local-layers", type=int, default=2,
                        help="lsplit's split: N local layers at each end [default: 2]")
    parser.add_argument("--venv", type=Path, default=CACHE / "llama-venv",
                        help="virtual environment for llama-cpp-python, created if missing "
                        "[default: %(default)s]")
    parser.add_argument("--kv-cache", default="f16", choices=["f32", "f16", "q8"],
                        help="lsplit's KV cache precision [default: f16, as llama.cpp's]")
    parser.add_argument("--no-paired", dest="paired", action="store_false",
                        help="leave out split / unsplit measured in one process")
    parser.add_argument("--lsplit", type=Path,
                        help="the lsplit binary [default: build target/release/lsplit]")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    unknown = set(args.measures.split(",")) - set(MEASURES)
    if unknown:
        parser.error(f"unknown measures {sorted(unknown)}: give {', '.join(MEASURES)}")
    args.measures = [MEASURES[m] for m in args.measures.split(",")]

    started = time.monotonic()
    python = ensure_venv(args.venv)
    lsplit = args.lsplit
    if lsplit is None:
        subprocess.run(["cargo", "build", "--release", "-p", "lsplit"], cwd=REPO, check=True)
        lsplit = REPO / "target" / "release" / "lsplit"
    models = resolve_models(args.models.split(","), lsplit, python)
    load = os.getloadavg()[0]
    if load > 1.0:
        log(f"warning: the load average is {load:.1f}: other processes will disturb the timings")
    results = {name: benchmark(name, path, args, python, lsplit) for name, path in models.items()}
    command = " ".join(["python3", "bench/vs_llama_cpp.py", *sys.argv[1:]])
    print(table(results, models, args, command, (time.monotonic() - started) / 60, load))


if __name__ == "__main__":
    main()
