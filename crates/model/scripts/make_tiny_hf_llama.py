#!/usr/bin/env python3
"""Generate tiny random-weight Llama-architecture Hugging Face model directories
plus golden logits, as test fixtures for the Rust safetensors loader in
`crates/model`.

This script is run BY HAND when the fixtures need regenerating. It is NOT run in
CI: CI (and the Rust tests) only read the committed output under
`crates/model/tests/data/`. Only PyPI is needed to set the environment up.

Output (each a complete HF model dir, loadable with
`transformers.AutoModelForCausalLM.from_pretrained` / `AutoTokenizer`):

  crates/model/tests/data/tiny-llama-hf/
      Llama-3 style: GQA (4 query heads, 2 KV heads), rope_theta 500000 with
      `rope_scaling` of rope_type "llama3", untied `lm_head.weight`, float32
      weights saved SHARDED (model-0000X-of-0000N.safetensors +
      model.safetensors.index.json).
  crates/model/tests/data/tiny-llama-hf-tied/
      MHA (4/4 heads), rope_theta 10000, no rope_scaling, tie_word_embeddings
      true (no `lm_head.weight` tensor on disk), a single model.safetensors with
      weights in bfloat16. Golden logits are computed in float32 from the
      bf16-rounded weights (the saved dir is loaded back and upcast).

Each dir also gets:
  config.json / generation_config.json
      as written by save_pretrained, except that tiny-llama-hf's config.json
      has the key "dtype" renamed to "torch_dtype" (the older spelling, found
      on Llama-3.x Hub checkpoints); tiny-llama-hf-tied keeps "dtype" and has
      "rope_scaling": null.
  tokenizer.json / tokenizer_config.json / special_tokens_map.json
      a byte-level BPE (vocab 320, ByteLevel pre-tokenizer and decoder, BOS
      prepended by the post-processor) trained on a few sentences, with a
      ChatML-style chat_template inside tokenizer_config.json. Special
      tokens: 0 <|pad|>, 1 <|begin_of_text|> (bos), 2 <|end_of_text|> (eos),
      3 <|im_start|>, 4 <|im_end|>.
  golden_logits.json
      {"input_ids": PROMPT, "logits": [[320 floats] per position] (float32
      forward of the full prompt, no KV cache, eager attention),
      "greedy_next_16": 16 tokens of model.generate(do_sample=False,
      max_new_tokens=16) after the prompt (EOS never occurs in them, checked;
      also checked against a plain argmax loop without cache),
      "transformers_version", "torch_version", ...}
      Floats are written with 9 significant digits (exact float32 round trip).
  golden_tokenizer.json
      a few strings with their token ids and decoded text, and a rendered
      chat template, for tokenizer tests.

How to run (from the repository root):

  python3 -m venv /root/.cache/lambda-split/hf-venv
  /root/.cache/lambda-split/hf-venv/bin/pip install torch==2.15.0 \
      transformers==4.57.6 tokenizers==0.22.2 safetensors==0.8.0 numpy==2.4.6
  /root/.cache/lambda-split/hf-venv/bin/python \
      crates/model/scripts/make_tiny_hf_llama.py

  (`--out-root DIR` writes the two dirs somewhere else.)

Last run with: Python 3.11.7, torch 2.15.0 (the PyPI wheel, run on CPU),
transformers 4.57.6, tokenizers 0.22.2, safetensors 0.8.0, numpy 2.4.6.

Why transformers 4.x: 4.57 writes config.json with top-level "rope_theta" and
"rope_scaling", as found on nearly all Llama checkpoints on the Hub (it spells
the dtype key "dtype"; older versions wrote "torch_dtype", hence the rename
above for one dir). transformers 5.x instead writes "rope_parameters" (holding
rope_theta and the llama3 scaling fields); it still reads the 4.x format. The
script refuses to run with 5.x so the fixtures keep the common format. The
output was cross-checked: transformers 5.24.0 (tokenizers 0.23.3) loads both
dirs and reproduces the golden logits (max abs diff 5e-9), greedy tokens,
tokenizer ids and chat rendering; check_tiny_hf_llama_numpy.py (next to this
file, numpy only) reproduces logits to ~3e-6 and the greedy tokens.

Everything is seeded (torch.manual_seed(0) before building each model), and
re-running with the same versions gives byte-identical files.
"""

import argparse
import json
import math
import os
import shutil
import sys

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

PROMPT = [1, 17, 42, 99, 5, 250, 3, 77, 123, 200, 64, 31]
NEW_TOKENS = 16
VOCAB = 320
INIT_STD = 0.1

PAD, BOS, EOS, IM_START, IM_END = (
    "<|pad|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|im_start|>",
    "<|im_end|>",
)
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]  # ids 0..4

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Split inference runs the first layers of a language model on one machine "
    "and the remaining layers on another.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Llama models use rotary position embeddings, RMS normalisation and SwiGLU.",
    "The tokenizer turns text into bytes, then merges frequent byte pairs.",
    "user: what is the capital of France?\nassistant: The capital of France is Paris.",
]

TOKENIZER_SAMPLES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and\ttabs\nnew lines",
    "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f642",
]


BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
)

VARIANTS = {
    "tiny-llama-hf": dict(
        config=dict(
            BASE,
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            tie_word_embeddings=False,
        ),
        save_dtype=torch.float32,
        max_shard_size="200KB",
        # transformers 4.57 writes "dtype"; Llama-3.x checkpoints on the Hub have
        # the older key "torch_dtype". This dir gets "torch_dtype", the tied one
        # keeps "dtype", so a loader is tested on both spellings.
        legacy_torch_dtype_key=True,
    ),
    "tiny-llama-hf-tied": dict(
        config=dict(
            BASE,
            num_key_value_heads=4,
            rope_theta=10000.0,
            rope_scaling=None,
            tie_word_embeddings=True,
        ),
        save_dtype=torch.bfloat16,
        max_shard_size="50MB",  # one file: model.safetensors
        legacy_torch_dtype_key=False,
    ),
}


def sig(x, digits=9):
    """Round to `digits` significant digits (9 = exact float32 round trip)."""
    x = float(x)
    if x == 0.0 or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def build_tokenizer():
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=1,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TRAIN_TEXT, trainer=trainer)
    # Like Llama 3: BOS is prepended when encoding with special tokens.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS}:1 $B:1",
                special_tokens=[(BOS, tok.token_to_id(BOS))],
            ),
        ]
    )
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def save_tokenizer(out_dir, tok):
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=BASE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    # save_jinja_files=False: keep chat_template inside tokenizer_config.json (as
    # on most Hub checkpoints) instead of a separate chat_template.jinja.
    fast.save_pretrained(out_dir, save_jinja_files=False)
    assert not os.path.exists(os.path.join(out_dir, "chat_template.jinja"))

    # Reload the way a user would and write a small tokenizer golden.
    t = AutoTokenizer.from_pretrained(out_dir)
    samples = []
    for s in TOKENIZER_SAMPLES:
        ids = t(s)["input_ids"]
        assert ids[0] == 1
        samples.append(
            {
                "text": s,
                "ids_with_special": ids,
                "ids_without_special": t(s, add_special_tokens=False)["input_ids"],
                "decoded_skip_special": t.decode(ids, skip_special_tokens=True),
            }
        )
        assert samples[-1]["decoded_skip_special"] == s
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello, world!"},
    ]
    rendered = t.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat_ids = t.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(chat_ids, dict) or hasattr(chat_ids, "keys"):
        chat_ids = chat_ids["input_ids"]
    golden = {
        "samples": samples,
        "chat": {
            "messages": messages,
            "add_generation_prompt": True,
            "rendered": rendered,
            "ids": list(chat_ids),
        },
        "special_tokens": {s: i for i, s in enumerate(SPECIAL_TOKENS)},
        "tokenizers_version": __import__("tokenizers").__version__,
        "transformers_version": transformers.__version__,
    }
    with open(os.path.join(out_dir, "golden_tokenizer.json"), "w") as f:
        json.dump(golden, f, indent=1, ensure_ascii=False)
        f.write("\n")


@torch.no_grad()
def reinit_(model):
    """Larger-than-default init so the logits are far from uniform."""
    for name, p in model.named_parameters():  # tied weights are listed once
        if name.endswith("norm.weight"):
            p.copy_(1.0 + INIT_STD * torch.randn_like(p))
        else:
            p.normal_(0.0, INIT_STD)


@torch.no_grad()
def greedy_no_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
        ids.append(int(torch.argmax(logits)))
    return ids[len(prompt):]


def make_variant(out_root, name, spec):
    out_dir = os.path.join(out_root, name)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)

    torch.manual_seed(0)  # per variant, so each dir is reproducible on its own
    config = LlamaConfig(**spec["config"], dtype="float32")
    model = LlamaForCausalLM(config).eval()
    reinit_(model)
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model = model.to(spec["save_dtype"])
    model.save_pretrained(
        out_dir, safe_serialization=True, max_shard_size=spec["max_shard_size"]
    )
    if spec["legacy_torch_dtype_key"]:
        cfg_path = os.path.join(out_dir, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg = {("torch_dtype" if k == "dtype" else k): v for k, v in cfg.items()}
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
    save_tokenizer(out_dir, build_tokenizer())

    # Golden: load back what is on disk, compute in float32.
    ref = LlamaForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert ref.dtype == torch.float32
    input_ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = ref(input_ids, use_cache=False).logits[0]
        gen_cfg = GenerationConfig(
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        out = ref.generate(input_ids, generation_config=gen_cfg)
    greedy = out[0, len(PROMPT):].tolist()
    # If EOS ever became a greedy pick, generate would stop early: fail loudly
    # rather than write a short or ambiguous golden.
    assert len(greedy) == NEW_TOKENS and 2 not in greedy, greedy
    assert greedy == greedy_no_cache(ref, PROMPT, NEW_TOKENS), "cache/no-cache greedy differ"

    golden = {
        "model_dir": name,
        "input_ids": PROMPT,
        "logits_shape": list(logits.shape),
        "logits": [[sig(v) for v in row] for row in logits.tolist()],
        "greedy_next_16": greedy,
        "greedy_note": "model.generate(do_sample=False, max_new_tokens=16); EOS (2) "
        "does not occur, so it never stopped early; equals a plain argmax loop "
        "without KV cache",
        "weights_dtype_on_disk": str(spec["save_dtype"]).replace("torch.", ""),
        "compute_dtype": "float32",
        "attn_implementation": "eager",
        "init": f"torch.manual_seed(0); linear/embedding N(0, {INIT_STD}); "
        f"norm weights 1 + {INIT_STD}*N(0,1)",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    with open(os.path.join(out_dir, "golden_logits.json"), "w") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")

    for fn in os.listdir(out_dir):
        assert not fn.endswith((".bin", ".pt", ".pth", ".ckpt")), fn
    print(f"{name}: greedy_next_16={greedy}")
    print(f"  logits[-1][:5]={[sig(v, 7) for v in logits[-1, :5].tolist()]}  "
          f"std={logits.std().item():.4f}")
    return out_dir


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out-root",
        default=os.path.normpath(os.path.join(here, "..", "tests", "data")),
        help="directory that receives tiny-llama-hf/ and tiny-llama-hf-tied/",
    )
    args = ap.parse_args()

    if int(transformers.__version__.split(".")[0]) >= 5:
        sys.exit(
            f"transformers {transformers.__version__}: use 4.x (see the docstring); "
            "5.x writes rope_parameters/dtype instead of rope_theta/rope_scaling/torch_dtype"
        )

    torch.set_num_threads(1)
    os.makedirs(args.out_root, exist_ok=True)
    for name, spec in VARIANTS.items():
        make_variant(args.out_root, name, spec)


if __name__ == "__main__":
    main()
