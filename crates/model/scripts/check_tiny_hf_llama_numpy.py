#!/usr/bin/env python3
"""Independent check of the fixtures written by make_tiny_hf_llama.py.

Reads the safetensors files byte by byte (8-byte little-endian header length,
JSON header, raw little-endian data; BF16 is widened to F32 by shifting into the
high 16 bits), follows model.safetensors.index.json when the dir is sharded,
and runs a plain float64 numpy Llama forward pass (RMSNorm, rotate-half RoPE
with optional "llama3" frequency scaling, GQA by repeating each KV head for
num_attention_heads / num_key_value_heads consecutive query heads, causal
softmax, SwiGLU MLP, tied or untied lm_head). It compares the logits with
golden_logits.json and re-derives greedy_next_16 with an argmax loop.

It uses neither torch nor transformers, so it is a second opinion on the
golden files and a readable spec of the math the Rust loader must reproduce.
Run by hand, not in CI. Needs only numpy:

  /root/.cache/lambda-split/hf-venv/bin/python \
      crates/model/scripts/check_tiny_hf_llama_numpy.py [DIR ...]

(default DIRs: crates/model/tests/data/tiny-llama-hf{,-tied}).
Last run with: Python 3.11.7, numpy 2.4.6.
"""

import json
import math
import os
import struct
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def read_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        arr = np.frombuffer(data[a:b], dtype=DTYPES[info["dtype"]])
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr.reshape(info["shape"]).astype(np.float64)
    return out


def load_weights(d):
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = json.load(open(index))["weight_map"]
        w = {}
        for shard in sorted(set(weight_map.values())):
            part = read_safetensors(os.path.join(d, shard))
            for k, v in part.items():
                assert weight_map[k] == shard, k
                w[k] = v
        assert set(w) == set(weight_map)
        return w
    return read_safetensors(os.path.join(d, "model.safetensors"))


def inv_freq(cfg, head_dim):
    theta = cfg["rope_theta"]
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    rs = cfg.get("rope_scaling")
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old / lo, old / hi
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > low_wl, inv / factor, inv)
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = np.where(medium, (1 - smooth) * inv / factor + smooth * inv, scaled)
    else:
        assert rs is None, rs
    return inv


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, cos, sin):  # x: (heads, T, hd); rotate_half layout (not interleaved)
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def forward(cfg, w, ids):
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or H // nh
    eps = cfg["rms_norm_eps"]
    T = len(ids)
    freqs = np.outer(np.arange(T), inv_freq(cfg, hd))
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb), np.sin(emb)
    mask = np.triu(np.full((T, T), -np.inf), 1)

    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd).transpose(1, 0, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd).transpose(1, 0, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd).transpose(1, 0, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        rep = nh // nkv
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(T, nh * hd)
        x = x + a @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    if cfg.get("tie_word_embeddings"):
        assert "lm_head.weight" not in w
        head = w["model.embed_tokens.weight"]
    else:
        head = w["lm_head.weight"]
    return x @ head.T


def check(d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    golden = json.load(open(os.path.join(d, "golden_logits.json")))
    w = load_weights(d)
    ids = golden["input_ids"]
    logits = forward(cfg, w, ids)
    ref = np.array(golden["logits"])
    err = np.abs(logits - ref).max()
    seq = list(ids)
    for _ in range(len(golden["greedy_next_16"])):
        seq.append(int(np.argmax(forward(cfg, w, seq)[-1])))
    greedy = seq[len(ids):]
    ok = err < 1e-4 and greedy == golden["greedy_next_16"]
    print(f"{os.path.basename(d)}: {len(w)} tensors, max|numpy-golden|={err:.3e}, "
          f"greedy {'matches' if greedy == golden['greedy_next_16'] else 'DIFFERS: ' + str(greedy)}"
          f" -> {'OK' if ok else 'FAIL'}")
    return ok


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    data = os.path.normpath(os.path.join(here, "..", "tests", "data"))
    dirs = sys.argv[1:] or [os.path.join(data, n) for n in ("tiny-llama-hf", "tiny-llama-hf-tied")]
    sys.exit(0 if all([check(d) for d in dirs]) else 1)


if __name__ == "__main__":
    main()
