"""Requantize a GGUF model with llama.cpp's own quantizer (K-quant mixes included).

Purpose: the K-quant files of `bench/vs_llama_cpp.py` (Q4_K_M, Q5_K_M, Q6_K), made from the Q8_0
synthetic model of `bench/make_synthetic_gguf.py` the way people make theirs, by
`llama_model_quantize` with `allow_requantize` (llama-cpp-python). The mixes are llama.cpp's: a
Q4_K_M file holds Q6_K matrices too, and llama.cpp falls back to other types (Q5_0, Q8_0) for
matrices whose rows are not a multiple of 256, so the files hold several types.

Not run by CI. Run it with the Python of the benchmark's virtual environment, e.g.

    ~/.cache/lambda-split/llama-venv/bin/python bench/requantize_gguf.py \\
        --from ~/.cache/lambda-split/synthetic/tinyllama-1.1b-shape-random.q8_0.gguf --type q4_k_m

It writes `<input stem without its type>.<type>.gguf` next to the input (or into `--out-dir`) and
prints the path; an existing file is kept unless `--force` is given.
"""

import argparse
import ctypes
import os
import sys
from pathlib import Path

import llama_cpp

TYPES = {
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", type=Path, required=True,
                        help="the GGUF file to requantize")
    parser.add_argument("--type", choices=sorted(TYPES), required=True)
    parser.add_argument("--out-dir", type=Path, help="[default: the input's directory]")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--force", action="store_true", help="rewrite an existing file")
    args = parser.parse_args()

    stem = args.source.name.removesuffix(".gguf").rsplit(".", 1)[0]
    out_dir = args.out_dir or args.source.parent
    out = out_dir / f"{stem}.{args.type}.gguf"
    if out.exists() and not args.force:
        print(out)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = TYPES[args.type]
    params.allow_requantize = True
    params.nthread = args.threads
    # Written under a temporary name, so that an interrupted run leaves no partial file behind
    # that a later run would take for a finished one.
    partial = out.with_suffix(".partial")
    status = llama_cpp.llama_model_quantize(str(args.source).encode(), str(partial).encode(),
                                            ctypes.byref(params))
    if status != 0:
        partial.unlink(missing_ok=True)
        sys.exit(f"llama_model_quantize failed ({status}) on {args.source}")
    partial.rename(out)
    print(out)


if __name__ == "__main__":
    main()
