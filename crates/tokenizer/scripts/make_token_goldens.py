"""Write llama.cpp's tokenization of the default model as golden data for the Rust tests.

llama.cpp is the reference tokenizer for GGUF files. This script loads the SmolLM2 GGUF with
llama-cpp-python (vocabulary only) and records, for a fixed list of strings, the token ids
llama.cpp produces (special tokens parsed, no BOS) and its detokenized text, plus the ids
llama.cpp treats as end of generation. Output: crates/tokenizer/tests/data/smollm2_tokens.json.

Run by hand (not in CI), from the repository root:

    python3 -m venv /root/.cache/lambda-split/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=ON" /root/.cache/lambda-split/llama-venv/bin/pip install \
        llama-cpp-python==0.3.36
    /root/.cache/lambda-split/llama-venv/bin/python crates/tokenizer/scripts/make_token_goldens.py \
        PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf

The GGUF is the one `lsplit_fetch::ensure_default_model()` installs.
"""

import json
import pathlib
import sys

import llama_cpp

STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "multiple   spaces    here",
    "tabs\tand\nnewlines\r\nand\n\n\nblank lines",
    "    indented code",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "fn main() { println!(\"{}\", 1 + 2); }",
    "for (int i = 0; i < 10; ++i) { x[i] = i * i; }",
    "1234567",
    "3.14159",
    "-42 + 1e-10 = 0x1F",
    "2024-03-15T12:34:56Z",
    "On 15/03/2024 at 09:30, $1,000,000.00 (about €920,000) was 99.9% of it.",
    "Emoji: 🤖👍🏽 and 👨‍👩‍👧‍👦 family",
    "日本語のテキストです。",
    "中文：你好，世界！",
    "한국어 문장입니다.",
    "مرحبا بالعالم",
    "Привет, мир!",
    "Ελληνικά γράμματα",
    "café naïve résumé Zürich São Paulo",
    "e\u0301 combining accent",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|im_end|>more text",
    "<|im_start|>system\nYou are helpful.<|im_end|>",
    "<|im_start |>not special<|im_end",
    "< |im_start|> <im_start> |im_start|",
    "<s></s><unk> [INST] not special here",
    "It's, we're, they've, I'm, you'll, he'd",
    "IT'S LOUD AND I'M SHOUTING",
    "URL: https://example.com/path?query=1&x=y#frag",
    "email@example.com, @mention #hashtag",
    "snake_case camelCase PascalCase kebab-case SCREAMING_CASE",
    "a" * 50,
    "!!!???...---___***",
    "\u00a0non-breaking\u2003em space\u200bzero width",
    "",
    " ",
    "\n",
    "Mixed: abc123def 456ghi 7 8 9",
    "<jupyter_code>print(1)<jupyter_output>1",
    # Bytes 0x04 and 0xF2 have no token in SmolLM2's byte alphabet: llama.cpp drops them.
    "unencodable: \x04 \U000934bb end",
]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    model_path = sys.argv[1]
    llm = llama_cpp.Llama(model_path=model_path, vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    cases = []
    for text in STRINGS:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        detok = llm.detokenize(ids, special=True).decode("utf-8", errors="replace")
        cases.append({"text": text, "ids": ids, "detokenized": detok})
    golden = {
        "model": pathlib.Path(model_path).name,
        "generator": f"llama-cpp-python {llama_cpp.__version__}",
        "n_vocab": n_vocab,
        "eog_ids": [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)],
        "bos_id": llama_cpp.llama_vocab_bos(vocab),
        "eos_id": llama_cpp.llama_vocab_eos(vocab),
        "cases": cases,
    }
    out = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "smollm2_tokens.json"
    out.write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
