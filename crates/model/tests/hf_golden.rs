//! The Hugging Face path against Python transformers: two tiny random Llama directories
//! (`tests/data/tiny-llama-hf`: 5 sharded f32 safetensors with an index, GQA 4/2,
//! rope_theta 500000, llama3 RoPE scaling, untied LM head; `tests/data/tiny-llama-hf-tied`: a
//! single bf16 safetensors, MHA, tied embeddings) with the logits and greedy tokens
//! transformers computed for them (`scripts/make_tiny_hf_llama.py`).
//!
//! Tolerance: both sides compute in f32 from the same weights (the bf16 ones upcast exactly),
//! but with different kernels: matmul blocking and summation order, softmax, RMSNorm, and
//! RoPE tables (ours are `cos(pos * inv_freq)` in f32, torch's come from its own f32 ops).
//! Each op differs by a few ulps; over 4 layers that stays far below 1e-4 on logits of
//! magnitude ~3, while any real mistake (RoPE convention, scaling, GQA grouping, a missing
//! norm) moves logits by 1e-2 or more. So the logits must agree within 1e-4 absolute.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use common::{argmax, assert_splits_exact, max_abs_diff, whole_step};
use lsplit_model::{ModelFormat, ModelSource, PartSpec, RopeScaling, SplitPlan};
use lsplit_tokenizer::{ChatMessage, Tokenizer};
use serde::Deserialize;

const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct GoldenLogits {
    input_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy_next_16: Vec<u32>,
}

#[derive(Deserialize)]
struct Sample {
    text: String,
    ids_with_special: Vec<u32>,
    ids_without_special: Vec<u32>,
    decoded_skip_special: String,
}

#[derive(Deserialize)]
struct Chat {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    rendered: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct GoldenTokenizer {
    samples: Vec<Sample>,
    chat: Chat,
    special_tokens: std::collections::BTreeMap<String, u32>,
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> T {
    let text = std::fs::read_to_string(path).expect("read golden file");
    serde_json::from_str(&text).expect("parse golden file")
}

fn check_logits(name: &str) {
    let dir = fixture(name);
    let golden: GoldenLogits = read_json(&dir.join("golden_logits.json"));
    assert_eq!(golden.input_ids.len(), 12);
    assert_eq!(golden.logits.len(), 12);
    assert!(golden.logits.iter().all(|row| row.len() == 320));

    let source = ModelSource::open(&dir).expect("open HF directory");
    assert_eq!(source.format(), ModelFormat::HuggingFace);
    let layers = source.config().num_layers;
    assert_eq!(layers, 4);
    let whole = source
        .load_part(&PartSpec::whole(layers), &Device::Cpu)
        .expect("load whole model");

    // One token at a time: every position's logits against transformers' row.
    let mut cache = whole.new_cache();
    for (pos, (&id, expected)) in golden.input_ids.iter().zip(&golden.logits).enumerate() {
        let logits = whole_step(&whole, &mut cache, &[id]);
        let diff = max_abs_diff(&logits, expected);
        assert!(
            diff <= TOLERANCE,
            "{name}: position {pos}: max abs diff {diff} > {TOLERANCE}"
        );
        assert_eq!(argmax(&logits), argmax(expected), "{name}: position {pos}");
    }

    // The whole prompt in one pass: the last row.
    let mut cache = whole.new_cache();
    let mut logits = whole_step(&whole, &mut cache, &golden.input_ids);
    let diff = max_abs_diff(&logits, golden.logits.last().expect("rows"));
    assert!(diff <= TOLERANCE, "{name}: prefill: max abs diff {diff}");

    // Greedy continuation with the KV cache.
    let mut greedy = Vec::new();
    let mut steps = vec![logits.clone()];
    for _ in 0..16 {
        let next = argmax(&logits);
        greedy.push(next);
        logits = whole_step(&whole, &mut cache, &[next]);
        steps.push(logits.clone());
    }
    assert_eq!(greedy, golden.greedy_next_16, "{name}: greedy tokens");

    // Splits are bit-identical to the unsplit run, prefill and every decode step.
    assert_splits_exact(
        &source,
        &[(0, 0), (0, 4), (4, 4), (1, 3), (2, 2), (3, 4), (0, 1)],
        &golden.input_ids,
        &greedy,
        &steps,
        name,
    );
}

#[test]
fn sharded_f32_gqa_llama3_untied_matches_transformers() {
    let source = ModelSource::open(&fixture("tiny-llama-hf")).expect("open");
    let c = source.config();
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 2, 16));
    assert_eq!(c.rope_theta, 500_000.0);
    assert_eq!(
        c.rope_scaling,
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        }
    );
    assert!(!c.tied_embeddings);
    assert!(!c.rope_interleaved);
    let tensors = source.part_tensors(&PartSpec::whole(4)).expect("tensors");
    assert_eq!(tensors.len(), 2 + 9 * 4 + 1);
    assert!(tensors.iter().any(|r| r.name == "lm_head.weight"));
    check_logits("tiny-llama-hf");
}

#[test]
fn single_bf16_mha_tied_matches_transformers() {
    let source = ModelSource::open(&fixture("tiny-llama-hf-tied")).expect("open");
    let c = source.config();
    assert_eq!((c.num_heads, c.num_kv_heads), (4, 4));
    assert_eq!(c.rope_scaling, RopeScaling::None);
    assert!(c.tied_embeddings);
    let tensors = source.part_tensors(&PartSpec::whole(4)).expect("tensors");
    assert_eq!(tensors.len(), 2 + 9 * 4);
    assert!(tensors.iter().all(|r| r.name != "lm_head.weight"));
    // Loaded weights are f32 whatever the file stores.
    assert!(tensors.iter().all(|r| r.dtype == "f32"));
    let tail = source
        .part_tensors(&SplitPlan::new(2, 3, 4).expect("plan").tail())
        .expect("tail tensors");
    assert!(
        tail.iter().any(|r| r.name == "model.embed_tokens.weight"),
        "the tied tail holds the embeddings as its LM head"
    );
    check_logits("tiny-llama-hf-tied");
}

#[test]
fn hf_tokenizer_matches_transformers() {
    for name in ["tiny-llama-hf", "tiny-llama-hf-tied"] {
        let dir = fixture(name);
        let golden: GoldenTokenizer = read_json(&dir.join("golden_tokenizer.json"));
        let tokenizer = Tokenizer::from_hf_dir(&dir).expect("load tokenizer");
        assert_eq!(tokenizer.vocab_size(), 320, "{name}");
        for sample in &golden.samples {
            assert_eq!(
                tokenizer.encode(&sample.text, true).expect("encode"),
                sample.ids_with_special,
                "{name}: {:?} with BOS",
                sample.text
            );
            assert_eq!(
                tokenizer.encode(&sample.text, false).expect("encode"),
                sample.ids_without_special,
                "{name}: {:?} without BOS",
                sample.text
            );
            assert_eq!(
                tokenizer
                    .decode(&sample.ids_without_special)
                    .expect("decode"),
                sample.decoded_skip_special,
                "{name}"
            );
        }
        for (text, &id) in &golden.special_tokens {
            assert_eq!(tokenizer.token_to_id(text), Some(id), "{name}: {text}");
        }
        assert_eq!(tokenizer.bos_token(), Some(1), "{name}");
        assert!(tokenizer.eos_tokens().contains(&2), "{name}");
        let rendered = tokenizer
            .apply_chat_template(&golden.chat.messages, golden.chat.add_generation_prompt)
            .expect("chat template");
        assert_eq!(rendered, golden.chat.rendered, "{name}");
        assert_eq!(
            tokenizer.encode(&rendered, true).expect("encode"),
            golden.chat.ids,
            "{name}: the template writes BOS itself, encode must not add a second"
        );
    }
}

/// The comparison has teeth: the same weights read without the llama3 RoPE scaling give
/// logits that miss transformers' by far more than the tolerance at every position but the
/// first (where RoPE rotates by zero).
#[test]
fn golden_logits_detect_missing_rope_scaling() {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixture("tiny-llama-hf")).expect("fixture") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
    }
    let config = std::fs::read_to_string(dir.path().join("config.json")).expect("read");
    let mut config: serde_json::Value = serde_json::from_str(&config).expect("parse");
    config["rope_scaling"] = serde_json::Value::Null;
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("write");

    let golden: GoldenLogits = read_json(&fixture("tiny-llama-hf").join("golden_logits.json"));
    let source = ModelSource::open(dir.path()).expect("open");
    assert_eq!(source.config().rope_scaling, RopeScaling::None);
    let whole = source
        .load_part(&PartSpec::whole(4), &Device::Cpu)
        .expect("load");
    let mut cache = whole.new_cache();
    for (pos, (&id, expected)) in golden.input_ids.iter().zip(&golden.logits).enumerate() {
        let diff = max_abs_diff(&whole_step(&whole, &mut cache, &[id]), expected);
        if pos == 0 {
            assert!(diff <= TOLERANCE, "position 0: {diff}");
        } else {
            assert!(diff > 100.0 * TOLERANCE, "position {pos}: only {diff}");
        }
    }
}
