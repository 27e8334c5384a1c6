"""Time llama.cpp (llama-cpp-python) on one GGUF file: one prefill, then greedy decoding.

Run by `bench/vs_llama_cpp.py` with the Python of the benchmark's virtual environment, one
process per measure, so that the peak memory of the process is llama.cpp's (plus the Python
interpreter's, which it reports separately). Not run by CI.

The prompt is the text `lsplit bench` uses, tokenized by llama.cpp without BOS and repeated to
exactly `--prompt-tokens` tokens. One token is evaluated untimed first, to fault in the
memory-mapped weights, and the cache is cleared. Then the prompt is evaluated in one `eval` call
(timed: prefill tokens/s), and `--decode-tokens` tokens are chosen greedily from the last logits
and evaluated one at a time (timed: decode tokens/s), as `lsplit bench` does. Prints one JSON
object: prefill and decode tokens/s, and the peak RSS of the process before the model was loaded
(KiB).
"""

import argparse
import itertools
import json
import resource
import time

import llama_cpp
import numpy as np

# The text `lsplit bench` builds its prompts from (crates/cli/src/commands/bench.rs).
TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening, counting the steps, watching "
    "the ships pass in the fading light, and writing in his logbook about the weather, the tides "
    "and the birds that nested on the rocks below. "
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--context", type=int, required=True)
    parser.add_argument("--prompt-tokens", type=int, required=True)
    parser.add_argument("--decode-tokens", type=int, required=True)
    args = parser.parse_args()

    baseline_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=args.context,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=512,
        verbose=False,
    )
    piece = llm.tokenize(TEXT.encode(), add_bos=False)
    prompt = list(itertools.islice(itertools.cycle(piece), args.prompt_tokens))

    llm.eval(prompt[:1])
    llm.reset()

    start = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - start)

    start = time.perf_counter()
    for _ in range(args.decode_tokens):
        logits = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)
        )
        llm.eval([int(logits.argmax())])
    decode = args.decode_tokens / (time.perf_counter() - start)

    print(json.dumps({"prefill": prefill, "decode": decode, "baseline_rss_kib": baseline_rss_kib}))


if __name__ == "__main__":
    main()
