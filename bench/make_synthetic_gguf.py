"""Write a synthetic GGUF model of TinyLlama-1.1B's shape, with seeded random weights.

Purpose: a model about eight times the size of SmolLM2-135M for `bench/vs_llama_cpp.py`, which
times llama.cpp and lsplit on the same file. The weights are random (normal, std 0.02, from a
seeded generator; norms are ones), so the model writes gibberish, but its speed is that of a
trained model of the same shape and tensor types: random weights are fine for speed.

Shape: llama architecture, 22 layers, hidden size 2048, 32 attention heads with 4 KV heads (head
size 64), FFN 5632, context 2048, RoPE base 10000, RMS norm epsilon 1e-5; vocabulary 49152 with
SmolLM2's tokenizer metadata (every `tokenizer.*` key) copied from the real SmolLM2 GGUF, so both
engines tokenize as they do for SmolLM2. Embeddings are untied, as in TinyLlama: the file holds
`token_embd.weight` and `output.weight`. Every matrix, embeddings and LM head included, is in the
chosen type (Q4_0 or Q8_0); the norms are F32.

Not run by CI. Run it with the Python of the benchmark's virtual environment (it needs numpy and
the `gguf` package), e.g.

    ~/.cache/lambda-split/llama-venv/bin/python bench/make_synthetic_gguf.py \\
        --tokenizer-from ~/.cache/lambda-split/models/SmolLM2-135M-Instruct.Q4_1.gguf --type q4_0

`--shape 7b` writes Llama-2-7B's shape instead (32 layers, hidden size 4096, 32 heads and 32 KV
heads, FFN 11008; 7.2 GB in Q8_0, about 2 GB of memory while writing), `--shape small` a five-layer
model of hidden size 256 for checking the scripts.

It writes `tinyllama-1.1b-shape-random.<type>.gguf` (`llama-7b-shape-random...`,
`small-shape-random...`) into `--out-dir` (default
~/.cache/lambda-split/synthetic; never into the repository: weights are not committed) and prints
the path. An existing file is kept unless `--force` is given.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quant_shape_to_byte_shape, quantize

# --shape: (file name stem, layers, hidden size, heads, KV heads, FFN size). `7b` is
# Llama-2-7B's shape (multi-head attention), for the GPU trunk's benchmark (issue 22) and the
# 7B Q4_K_M comparison with llama.cpp (issue 23); its vocabulary is SmolLM2's 49152 tokens
# rather than Llama-2's 32000 (the tokenizer must match), 1% more weights. `small` (five
# layers, so that a split with 2 local layers at each end leaves a trunk; every matrix a
# multiple of 256 columns, so K-quants cover it) checks the scripts' code paths in seconds.
SHAPES = {
    "1.1b": ("tinyllama-1.1b-shape-random", 22, 2048, 32, 4, 5632),
    "7b": ("llama-7b-shape-random", 32, 4096, 32, 32, 11008),
    "small": ("small-shape-random", 5, 256, 4, 2, 512),
}
TITLES = {"1.1b": "TinyLlama-1.1B shape", "7b": "Llama-2-7B shape", "small": "Small test shape"}
LAYERS, HIDDEN, HEADS, KV_HEADS, FFN = SHAPES["1.1b"][1:]
HEAD_DIM = HIDDEN // HEADS
VOCAB = 49152
CONTEXT = 2048
ROPE_BASE = 10000.0
RMS_EPS = 1e-5
WEIGHT_STD = 0.02

TYPES = {
    "q4_0": (GGMLQuantizationType.Q4_0, 2),  # (tensor type, general.file_type)
    "q8_0": (GGMLQuantizationType.Q8_0, 7),
    # Random blocks only (--random-blocks): Q4_K matrices, with attn_v, ffn_down and the LM head
    # in Q6_K, as llama.cpp's Q4_K_M mix holds (it keeps some of those in Q4_K too).
    "q4_k_m": (GGMLQuantizationType.Q4_K, 15),
}

# Bytes of one block, and where its f16 scales sit: (block bytes, offsets of f16 scales).
# Random bytes elsewhere are valid quants; the scales are set so that no value is NaN or huge.
RANDOM_BLOCKS = {
    GGMLQuantizationType.Q4_0: (18, (0,)),
    GGMLQuantizationType.Q8_0: (34, (0,)),
    GGMLQuantizationType.Q4_K: (144, (0, 2)),
    GGMLQuantizationType.Q6_K: (210, (208,)),
}


def set_shape(name: str) -> None:
    """Makes `name` (a key of SHAPES) the shape the functions below write."""
    global LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, HEAD_DIM
    LAYERS, HIDDEN, HEADS, KV_HEADS, FFN = SHAPES[name][1:]
    HEAD_DIM = HIDDEN // HEADS


def tensor_type(name: str, qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """The type of matrix `name` in a file of type `qtype` (Q4_K_M's mix for Q4_K)."""
    q6k = ("attn_v.weight", "ffn_down.weight", "output.weight")
    if qtype == GGMLQuantizationType.Q4_K and name.endswith(q6k):
        return GGMLQuantizationType.Q6_K
    return qtype


def random_blocks(rng: np.random.Generator, shape: tuple[int, ...],
                  qtype: GGMLQuantizationType) -> np.ndarray:
    """Random quantized bytes of a matrix of `shape`, every block's f16 scale set to 2^-12:
    the speed of real weights of that type, in seconds rather than minutes for a 7B shape."""
    block_bytes, scales = RANDOM_BLOCKS[qtype]
    byte_shape = quant_shape_to_byte_shape(shape, qtype)
    data = rng.integers(0, 256, size=byte_shape, dtype=np.uint8)
    blocks = data.reshape(-1, block_bytes)
    scale = np.frombuffer(np.float16(2.0 ** -12).tobytes(), dtype=np.uint8)
    for offset in scales:
        blocks[:, offset:offset + 2] = scale
    return data

DEFAULT_OUT_DIR = Path.home() / ".cache" / "lambda-split" / "synthetic"


def tensor_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor's name and numpy shape (rows = output features), in file order."""
    kv = KV_HEADS * HEAD_DIM
    shapes = [("token_embd.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        shapes += [
            (f"blk.{i}.attn_norm.weight", (HIDDEN,)),
            (f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN)),
            (f"blk.{i}.attn_k.weight", (kv, HIDDEN)),
            (f"blk.{i}.attn_v.weight", (kv, HIDDEN)),
            (f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN)),
            (f"blk.{i}.ffn_norm.weight", (HIDDEN,)),
            (f"blk.{i}.ffn_gate.weight", (FFN, HIDDEN)),
            (f"blk.{i}.ffn_up.weight", (FFN, HIDDEN)),
            (f"blk.{i}.ffn_down.weight", (HIDDEN, FFN)),
        ]
    shapes += [("output_norm.weight", (HIDDEN,)), ("output.weight", (VOCAB, HIDDEN))]
    return shapes


def copy_tokenizer_metadata(writer: GGUFWriter, source: Path) -> None:
    """Copies every `tokenizer.*` key of `source` into `writer`."""
    reader = GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    if len(tokens) != VOCAB:
        raise SystemExit(f"{source} has {len(tokens)} tokens; the synthetic model needs {VOCAB}")


def write_model(path: Path, qtype: GGMLQuantizationType, file_type: int, tokenizer_from: Path,
                seed: int, random: bool = False, title: str = "TinyLlama-1.1B shape") -> None:
    writer = GGUFWriter(path, "llama")
    writer.add_name(f"{title}, random weights (seed {seed})")
    writer.add_description("Synthetic benchmark model: random weights, not a trained model")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_BASE)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(VOCAB)
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)
    copy_tokenizer_metadata(writer, tokenizer_from)

    # Tensor infos first, then the data tensor by tensor, so that only one tensor is in memory.
    shapes = tensor_shapes()
    for name, shape in shapes:
        if len(shape) == 1:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            byte_shape = quant_shape_to_byte_shape(shape, tensor_type(name, qtype))
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8),
                                   int(np.prod(byte_shape)), raw_dtype=tensor_type(name, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for n, (name, shape) in enumerate(shapes, 1):
        if len(shape) == 1:
            data = np.ones(shape, dtype=np.float32)
        elif random:
            data = random_blocks(rng, shape, tensor_type(name, qtype))
        else:
            weights = rng.standard_normal(shape, dtype=np.float32) * np.float32(WEIGHT_STD)
            data = quantize(weights, qtype)
        writer.write_tensor_data(data)
        print(f"\r{n}/{len(shapes)} tensors", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer-from", type=Path, required=True,
                        help="a GGUF file with SmolLM2's tokenizer (the default lsplit model)")
    parser.add_argument("--type", choices=sorted(TYPES),
                        help="tensor type of the matrices (required unless --tokenizer-only)")
    parser.add_argument("--tokenizer-only", type=Path, metavar="OUT",
                        help="only write a GGUF file holding the tokenizer's keys to OUT (a few "
                             "MB, to carry where the real model cannot go), then stop")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.1b",
                        help="TinyLlama-1.1B's, Llama-2-7B's or a five-layer test shape "
                        "[default: 1.1b]")
    parser.add_argument("--random-blocks", action="store_true",
                        help="random quantized bytes with a fixed scale instead of quantized "
                             "normal weights: fast, for speed measures only (q4_k_m needs it)")
    parser.add_argument("--force", action="store_true", help="rewrite an existing file")
    args = parser.parse_args()
    if args.tokenizer_only:
        writer = GGUFWriter(args.tokenizer_only, "llama")
        copy_tokenizer_metadata(writer, args.tokenizer_from)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        print(args.tokenizer_only)
        return
    if args.type is None:
        parser.error("--type is required")
    if args.type == "q4_k_m" and not args.random_blocks:
        parser.error("--type q4_k_m is written with --random-blocks only")
    set_shape(args.shape)

    stem = SHAPES[args.shape][0]
    suffix = ".blocks" if args.random_blocks else ""
    path = args.out_dir / f"{stem}{suffix}.{args.type}.gguf"
    if args.force or not path.exists():
        args.out_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        qtype, file_type = TYPES[args.type]
        write_model(partial, qtype, file_type, args.tokenizer_from, args.seed,
                    args.random_blocks, TITLES[args.shape])
        os.replace(partial, path)
    print(path)


if __name__ == "__main__":
    main()
