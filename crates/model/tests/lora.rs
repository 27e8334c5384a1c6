//! LoRA adapters in PEFT's format against Python transformers + peft: two adapters with seeded
//! random weights (`tests/data/lora-head-tail`: r 4, alpha 8, every module of layers 0 and 3
//! of `tiny-llama-hf`; `tests/data/lora-rslora-tied`: rsLoRA r 8, alpha 4, q, v and down of
//! every layer of `tiny-llama-hf-tied`), one that `lsplit finetune` trained
//! (`tests/data/lora-finetuned`: r 4, every module of layers 0 and 3) and the logits and greedy tokens peft computed with
//! them (`scripts/golden_lora.py`).
//!
//! Tolerance: as `hf_golden.rs`, 1e-4 absolute on the logits (different kernels, same f32
//! arithmetic); the adapters move the logits by far more than that, so a missing or misplaced
//! update cannot pass. Split runs stay bit-identical to the unsplit run with an adapter.
//! A GGUF copy of the model (query and key rows permuted for interleaved RoPE, as llama.cpp
//! stores them) with the same adapter gives the Hugging Face copy's logits, and malformed
//! adapters are refused with errors that say what is wrong.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::{argmax, assert_splits_exact, max_abs_diff, ours_greedy, whole_step};
use lsplit_model::{ModelError, ModelSource, PartSpec, TrunkFingerprint};
use serde::Deserialize;

const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Golden {
    input_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy_next_16: Vec<u32>,
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn golden(adapter: &str) -> Golden {
    let text = std::fs::read_to_string(data(adapter).join("golden_logits.json")).expect("read");
    serde_json::from_str(&text).expect("parse golden file")
}

fn adapted(model: &Path, adapter: &str) -> ModelSource {
    let mut source = ModelSource::open(model).expect("open model");
    source.load_adapter(&data(adapter)).expect("load adapter");
    source
}

fn whole(source: &ModelSource) -> lsplit_model::ModelPart {
    source
        .load_part(&PartSpec::whole(source.config().num_layers), &Device::Cpu)
        .expect("whole model")
}

/// Every position's logits, one token at a time.
fn stepwise(source: &ModelSource, ids: &[u32]) -> Vec<Vec<f32>> {
    let part = whole(source);
    let mut cache = part.new_cache();
    ids.iter()
        .map(|&id| whole_step(&part, &mut cache, &[id]))
        .collect()
}

fn check_golden(model: &str, adapter: &str, splits: &[(usize, usize)]) {
    let golden = golden(adapter);
    let source = adapted(&data(model), adapter);
    for (pos, (logits, expected)) in stepwise(&source, &golden.input_ids)
        .iter()
        .zip(&golden.logits)
        .enumerate()
    {
        let diff = max_abs_diff(logits, expected);
        assert!(
            diff <= TOLERANCE,
            "{adapter}: position {pos}: max abs diff {diff}"
        );
        assert_eq!(
            argmax(logits),
            argmax(expected),
            "{adapter}: position {pos}"
        );
    }
    // Without the adapter the same model is far from peft's logits: the updates count.
    let plain = stepwise(
        &ModelSource::open(&data(model)).expect("open"),
        &golden.input_ids,
    );
    let moved = max_abs_diff(
        plain.last().expect("rows"),
        golden.logits.last().expect("rows"),
    );
    assert!(moved > 1000.0 * TOLERANCE, "{adapter}: moved only {moved}");

    // The prompt in one pass, then greedy decoding with the cache.
    let (greedy, steps) = ours_greedy(&source, &golden.input_ids, 16);
    let diff = max_abs_diff(&steps[0], golden.logits.last().expect("rows"));
    assert!(diff <= TOLERANCE, "{adapter}: prefill: max abs diff {diff}");
    assert_eq!(greedy, golden.greedy_next_16, "{adapter}: greedy tokens");

    // Split runs give the unsplit run's logits bit for bit, prefill and every decode step.
    assert_splits_exact(&source, splits, &golden.input_ids, &greedy, &steps, adapter);
}

#[test]
fn every_module_on_head_and_tail_layers_matches_peft() {
    // 1:3 keeps the adapted layers 0 and 3 on the device; the others put one in the trunk
    // (a server's public adapter), which must compute the same.
    check_golden(
        "tiny-llama-hf",
        "lora-head-tail",
        &[(1, 3), (1, 1), (2, 2), (0, 4), (1, 4), (0, 0), (4, 4)],
    );
}

#[test]
fn an_adapter_trained_by_lsplit_finetune_matches_peft() {
    // Written by `lsplit finetune` (the command of scripts/golden_lora.py's trained case), the
    // golden logits from peft loading it as it came out: peft reads what we write.
    check_golden("tiny-llama-hf", "lora-finetuned", &[(1, 3), (0, 0), (4, 4)]);
}

#[test]
fn rslora_on_every_layer_of_a_tied_model_matches_peft() {
    check_golden(
        "tiny-llama-hf-tied",
        "lora-rslora-tied",
        &[(0, 0), (2, 2), (1, 3), (4, 4)],
    );
}

#[test]
fn the_adapter_names_its_layers_and_refuses_a_trunk_that_holds_them() {
    let source = adapted(&data("tiny-llama-hf"), "lora-head-tail");
    let adapter = source.adapter().expect("adapter");
    assert_eq!(adapter.layers(), vec![0, 3]);
    assert_eq!(adapter.layers_in(1..4), vec![3]);
    assert!(adapter.describe().ends_with(
        "lora-head-tail (LoRA r 4, alpha 8, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, \
         down_proj)"
    ));
    adapter
        .check_off_trunk(1..3)
        .expect("layers 1 and 2 are not adapted");
    let err = adapter
        .check_off_trunk(0..4)
        .expect_err("touches the trunk");
    assert!(matches!(err, ModelError::AdapterOnTrunk { ref layers, .. } if layers == &[0, 3]));
    assert!(
        err.to_string().ends_with(
            "the adapter updates layers [0, 3], which the trunk (layers 0..4) runs: \
                        a device adapter may only update the head's and the tail's layers"
        ),
        "{err}"
    );
}

#[test]
fn an_adapter_changes_the_fingerprint_only_of_layers_it_updates() {
    let model = data("tiny-llama-hf");
    let plain = ModelSource::open(&model).expect("open");
    let source = adapted(&model, "lora-head-tail");
    let adapter = source.adapter().expect("adapter");
    let base = |layers| TrunkFingerprint::compute(&plain, layers).expect("fingerprint");
    // The fingerprint reads the model file: loading an adapter does not change it.
    assert_eq!(
        TrunkFingerprint::compute(&source, 1..3).expect("fp"),
        base(1..3)
    );
    let untouched = base(1..3).with_adapter(adapter).expect("fingerprint");
    assert_eq!(untouched, base(1..3));
    let touched = base(1..4).with_adapter(adapter).expect("fingerprint");
    assert_eq!(touched.layers, 1..4);
    assert_ne!(touched.sha256, base(1..4).sha256);
    let other = adapted(&data("tiny-llama-hf-tied"), "lora-rslora-tied");
    let tied = TrunkFingerprint::compute(&other, 1..4).expect("fingerprint");
    assert_ne!(
        tied.clone()
            .with_adapter(other.adapter().expect("adapter"))
            .expect("fp"),
        tied
    );
}

/// llama.cpp's row order for a query or key weight `(heads * head_dim, in)`: the two halves of
/// each head interleaved (written here independently of the crate's own permutation).
fn to_gguf_rows(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().expect("matrix");
    let half = rows / heads / 2;
    let values: Vec<Vec<f32>> = w.to_vec2().expect("values");
    let mut out = Vec::with_capacity(rows * cols);
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                out.extend_from_slice(&values[h * 2 * half + j * half + i]);
            }
        }
    }
    Tensor::from_vec(out, (rows, cols), &Device::Cpu).expect("tensor")
}

/// The GGUF copy of `tiny-llama-hf` (f32, no RoPE scaling) and the same model as a Hugging
/// Face directory without RoPE scaling.
fn gguf_and_hf_copies(dir: &Path) -> (PathBuf, PathBuf) {
    let hf = dir.join("hf");
    std::fs::create_dir(&hf).expect("mkdir");
    for entry in std::fs::read_dir(data("tiny-llama-hf")).expect("fixture") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), hf.join(entry.file_name())).expect("copy");
    }
    let config = std::fs::read_to_string(hf.join("config.json")).expect("read");
    let mut config: serde_json::Value = serde_json::from_str(&config).expect("parse");
    config["rope_scaling"] = serde_json::Value::Null;
    std::fs::write(hf.join("config.json"), config.to_string()).expect("write");

    let c = ModelSource::open(&hf).expect("open").config().clone();
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    for i in 1..=5 {
        let shard = data("tiny-llama-hf").join(format!("model-0000{i}-of-00005.safetensors"));
        weights.extend(candle_core::safetensors::load(shard, &Device::Cpu).expect("shard"));
    }
    let take = |name: &str| weights[name].to_dtype(DType::F32).expect("f32");
    let mut tensors = vec![
        (
            "token_embd.weight".to_string(),
            take("model.embed_tokens.weight"),
        ),
        ("output_norm.weight".to_string(), take("model.norm.weight")),
        ("output.weight".to_string(), take("lm_head.weight")),
    ];
    for l in 0..c.num_layers {
        let hf = |m: &str| take(&format!("model.layers.{l}.{m}.weight"));
        let mut push = |name: &str, t: Tensor| tensors.push((format!("blk.{l}.{name}.weight"), t));
        push("attn_norm", hf("input_layernorm"));
        push("attn_q", to_gguf_rows(&hf("self_attn.q_proj"), c.num_heads));
        push(
            "attn_k",
            to_gguf_rows(&hf("self_attn.k_proj"), c.num_kv_heads),
        );
        push("attn_v", hf("self_attn.v_proj"));
        push("attn_output", hf("self_attn.o_proj"));
        push("ffn_norm", hf("post_attention_layernorm"));
        push("ffn_gate", hf("mlp.gate_proj"));
        push("ffn_up", hf("mlp.up_proj"));
        push("ffn_down", hf("mlp.down_proj"));
    }
    let tensors: Vec<(String, QTensor)> = tensors
        .into_iter()
        .map(|(n, t)| (n, QTensor::quantize(&t, GgmlDType::F32).expect("f32")))
        .collect();
    let u = |v: usize| Value::U32(v as u32);
    let metadata = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.vocab_size", u(c.vocab_size)),
        ("llama.embedding_length", u(c.hidden_size)),
        ("llama.block_count", u(c.num_layers)),
        ("llama.feed_forward_length", u(c.intermediate_size)),
        ("llama.attention.head_count", u(c.num_heads)),
        ("llama.attention.head_count_kv", u(c.num_kv_heads)),
        ("llama.rope.dimension_count", u(c.head_dim)),
        ("llama.context_length", u(c.context_length)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(c.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base", Value::F32(c.rope_theta)),
    ];
    let gguf = dir.join("model.gguf");
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut file = std::fs::File::create(&gguf).expect("create");
    gguf_file::write(&mut file, &metadata, &tensors).expect("write GGUF");
    (gguf, hf)
}

#[test]
fn a_gguf_base_takes_the_adapter_in_its_permuted_query_and_key_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (gguf, hf) = gguf_and_hf_copies(dir.path());
    let ids = golden("lora-head-tail").input_ids;
    let plain_gguf = stepwise(&ModelSource::open(&gguf).expect("open"), &ids);
    let plain_hf = stepwise(&ModelSource::open(&hf).expect("open"), &ids);
    let with_gguf = stepwise(&adapted(&gguf, "lora-head-tail"), &ids);
    let with_hf = stepwise(&adapted(&hf, "lora-head-tail"), &ids);
    for pos in 0..ids.len() {
        // The copies agree without the adapter (so the GGUF copy is right)...
        let base = max_abs_diff(&plain_gguf[pos], &plain_hf[pos]);
        assert!(
            base <= TOLERANCE,
            "position {pos}: base models differ by {base}"
        );
        // ...and with it, though its query and key updates move every position past the first.
        let diff = max_abs_diff(&with_gguf[pos], &with_hf[pos]);
        assert!(
            diff <= TOLERANCE,
            "position {pos}: adapted models differ by {diff}"
        );
        let moved = max_abs_diff(&with_gguf[pos], &plain_gguf[pos]);
        assert!(
            moved > 1000.0 * TOLERANCE,
            "position {pos}: moved only {moved}"
        );
    }
}

/// A copy of `lora-head-tail` in `dir`, its config and tensors passed through the edits.
fn broken(
    dir: &Path,
    config: impl FnOnce(&mut serde_json::Value),
    tensors: impl FnOnce(&mut HashMap<String, Tensor>),
) -> PathBuf {
    let out = dir.join("adapter");
    std::fs::create_dir_all(&out).expect("mkdir");
    let text =
        std::fs::read_to_string(data("lora-head-tail").join("adapter_config.json")).expect("read");
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("parse");
    config(&mut json);
    std::fs::write(out.join("adapter_config.json"), json.to_string()).expect("write");
    let file = data("lora-head-tail").join("adapter_model.safetensors");
    let mut map = candle_core::safetensors::load(file, &Device::Cpu).expect("load");
    tensors(&mut map);
    candle_core::safetensors::save(&map, out.join("adapter_model.safetensors")).expect("save");
    out
}

const Q0_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";

fn refusal(dir: &Path) -> String {
    let mut source = ModelSource::open(&data("tiny-llama-hf")).expect("open");
    let err = source.load_adapter(dir).expect_err("must be refused");
    assert!(source.adapter().is_none());
    err.to_string()
}

#[test]
fn malformed_adapters_are_refused_with_the_reason() {
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    type TensorEdit = Box<dyn FnOnce(&mut HashMap<String, Tensor>)>;
    let none = || -> Edit { Box::new(|_| {}) };
    let keep = || -> TensorEdit { Box::new(|_| {}) };
    let set =
        |key: &'static str, value: serde_json::Value| -> Edit { Box::new(move |c| c[key] = value) };
    let zeros =
        |shape: &[usize], dtype: DType| Tensor::zeros(shape, dtype, &Device::Cpu).expect("tensor");
    let cases: Vec<(&str, Edit, TensorEdit, String)> = vec![
        (
            "unknown module",
            set("target_modules", serde_json::json!(["q_proj", "lm_head"])),
            keep(),
            "unknown target module `lm_head`".into(),
        ),
        (
            "regex",
            set("target_modules", serde_json::json!(".*proj")),
            keep(),
            "target_modules \".*proj\" is a pattern".into(),
        ),
        (
            "rank 0",
            set("r", serde_json::json!(0)),
            keep(),
            "rank r = 0 is not within 1..=64".into(),
        ),
        (
            "dora",
            set("use_dora", serde_json::json!(true)),
            keep(),
            "`use_dora` is set".into(),
        ),
        (
            "other method",
            set("peft_type", serde_json::json!("IA3")),
            keep(),
            "peft_type is IA3, not LORA".into(),
        ),
        (
            "layer out of range",
            set("layers_to_transform", serde_json::json!([0, 3, 9])),
            keep(),
            "layers_to_transform names layer 9, but the model has 4 layers".into(),
        ),
        (
            "layer not transformed",
            set("layers_to_transform", serde_json::json!(0)),
            keep(),
            "is of layer 3, which the adapter does not transform".into(),
        ),
        (
            "module not targeted",
            set("target_modules", serde_json::json!(["q_proj", "k_proj"])),
            keep(),
            "which target_modules does not name".into(),
        ),
        (
            "missing tensor",
            none(),
            Box::new(|m| {
                m.remove(Q0_A);
            }),
            format!("tensor `{Q0_A}` is missing"),
        ),
        (
            "wrong shape",
            none(),
            Box::new(move |m| {
                m.insert(Q0_A.into(), zeros(&[4, 63], DType::F32));
            }),
            format!("tensor `{Q0_A}` has shape [4, 63], expected [4, 64]"),
        ),
        (
            "wrong rank",
            set("r", serde_json::json!(8)),
            keep(),
            "has shape [4, 160], expected [8, 160]".into(),
        ),
        (
            "integer tensor",
            none(),
            Box::new(move |m| {
                m.insert(Q0_A.into(), zeros(&[4, 64], DType::I64));
            }),
            format!("tensor `{Q0_A}` is of type I64; LoRA matrices must be f32, f16 or bf16"),
        ),
        (
            "not finite",
            none(),
            Box::new(move |m| {
                let nan = Tensor::full(f32::NAN, (4, 64), &Device::Cpu).expect("tensor");
                m.insert(Q0_A.into(), nan);
            }),
            format!("tensor `{Q0_A}` holds a value that is not finite"),
        ),
        (
            "stranger tensor",
            none(),
            Box::new(move |m| {
                m.insert(
                    "base_model.model.lm_head.lora_A.weight".into(),
                    zeros(&[4, 64], DType::F32),
                );
            }),
            "unexpected tensor `base_model.model.lm_head.lora_A.weight`".into(),
        ),
    ];
    for (label, config, tensors, expected) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let message = refusal(&broken(dir.path(), config, tensors));
        assert!(
            message.contains(&expected),
            "{label}: {message:?} does not say {expected:?}"
        );
    }

    // A half-precision adapter is read (and upcast), not refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let half = broken(
        dir.path(),
        |_| {},
        |m| {
            for t in m.values_mut() {
                *t = t.to_dtype(DType::BF16).expect("bf16");
            }
        },
    );
    let mut source = ModelSource::open(&data("tiny-llama-hf")).expect("open");
    source.load_adapter(&half).expect("bf16 adapter");

    // Files that are not an adapter at all.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = broken(dir.path(), |_| {}, |_| {});
    std::fs::write(out.join("adapter_config.json"), "r = 4\n").expect("write");
    let message = refusal(&out);
    assert!(
        message.contains("adapter_config.json is not a PEFT LoRA configuration"),
        "{message}"
    );
    std::fs::remove_file(out.join("adapter_config.json")).expect("rm");
    assert!(refusal(&out).contains("adapter_config.json"));
    let out = broken(dir.path(), |_| {}, |_| {});
    std::fs::write(out.join("adapter_model.safetensors"), b"\xff\xff\xff\xff").expect("write");
    let message = refusal(&out);
    assert!(
        message.contains("adapter_model.safetensors is unreadable"),
        "{message}"
    );
    // Longer than the configuration's matrices could be: refused before it is read.
    let big = std::fs::File::create(out.join("adapter_model.safetensors")).expect("create");
    big.set_len(64 << 20).expect("grow");
    let message = refusal(&out);
    assert!(
        message.contains("more than an adapter of this configuration holds"),
        "{message}"
    );
}
