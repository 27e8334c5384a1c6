//! The differentiable training pass (`lsplit_model::{DenseLayer, DenseTrunk}`): its logits
//! against the inference path and against peft's golden logits with an adapter, finite-difference
//! checks of the LoRA gradients and of the trunk's input gradient, and split gradients equal to
//! the unsplit model's bit for bit.
//!
//! Tolerances: logits within 1e-4 of the inference path and of peft (the same f32 arithmetic in
//! another order: the training pass norms, rotates and normalises with candle's plain operations,
//! which have a backward pass, where inference uses fused kernels). Finite differences are
//! central, in f32, with a step of 1e-2: within 1e-3 + 2% of the analytic gradient (the rounding
//! of an f32 loss near 6 over a 2e-2 step is about 3e-5; the truncation error is O(step²)).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor, Var};
use common::{GgufModel, Rng, bits, max_abs_diff};
use lsplit_model::{
    DenseLayer, DenseTrunk, LayerPairs, LoraPair, LoraShape, ModelFormat, ModelSource, PartSpec,
    Pass, SplitPlan, Target, write_peft,
};
use serde::Deserialize;

const TOLERANCE: f32 = 1e-4;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Every row's logits of `ids` through the inference path (one prefill).
fn inference_logits(source: &ModelSource, ids: &[u32]) -> Vec<Vec<f32>> {
    let part = source
        .load_part(&PartSpec::whole(source.config().num_layers), &Device::Cpu)
        .expect("whole model");
    let mut cache = part.new_cache();
    let hidden = part
        .forward(&part.embed(ids).expect("embed"), 0, &mut cache)
        .expect("forward");
    part.row_logits(&hidden)
        .expect("logits")
        .to_vec2()
        .expect("rows")
}

/// The training pass's logits of `ids` over every layer, with `lora`'s pairs.
fn dense_logits(source: &ModelSource, ids: &[u32], lora: &BTreeMap<usize, LayerPairs>) -> Tensor {
    let pass = Pass::new(source.config(), ids.len()).expect("pass");
    let mut x = embed(source, ids);
    for layer in 0..source.config().num_layers {
        x = source
            .dense_layer(layer)
            .expect("layer")
            .forward(&x, lora.get(&layer), &pass)
            .expect("forward");
    }
    source
        .dense_output()
        .expect("output")
        .logits(&x, &pass)
        .expect("logits")
}

fn embed(source: &ModelSource, ids: &[u32]) -> Tensor {
    source
        .load_part(
            &SplitPlan::new(0, 0, source.config().num_layers)
                .expect("plan")
                .head(),
            &Device::Cpu,
        )
        .expect("head")
        .embed(ids)
        .expect("embed")
}

fn assert_rows_close(ours: &Tensor, expected: &[Vec<f32>], what: &str) {
    let ours: Vec<Vec<f32>> = ours.to_vec2().expect("rows");
    assert_eq!(ours.len(), expected.len(), "{what}: rows");
    for (pos, (a, b)) in ours.iter().zip(expected).enumerate() {
        let diff = max_abs_diff(a, b);
        assert!(
            diff <= TOLERANCE,
            "{what}: position {pos}: max abs diff {diff}"
        );
    }
}

#[test]
fn logits_match_the_inference_path_on_hugging_face_and_gguf_files() {
    let ids = [1u32, 17, 200, 42, 5, 99, 311, 7];
    let hf = ModelSource::open(&data("tiny-llama-hf")).expect("open");
    let expected = inference_logits(&hf, &ids);
    assert_rows_close(&dense_logits(&hf, &ids, &BTreeMap::new()), &expected, "hf");

    let tied = ModelSource::open(&data("tiny-llama-hf-tied")).expect("open");
    let expected = inference_logits(&tied, &ids);
    assert_rows_close(
        &dense_logits(&tied, &ids, &BTreeMap::new()),
        &expected,
        "tied",
    );

    // GGUF's interleaved RoPE order: a different rotation would move the logits far more.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.gguf");
    GgufModel::new(GgmlDType::F32, false, 7).write(&path);
    let gguf = ModelSource::open(&path).expect("open gguf");
    assert!(gguf.config().rope_interleaved);
    let expected = inference_logits(&gguf, &ids);
    assert_rows_close(
        &dense_logits(&gguf, &ids, &BTreeMap::new()),
        &expected,
        "gguf",
    );
}

#[derive(Deserialize)]
struct Golden {
    input_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

/// The pairs of a PEFT adapter file on a Hugging Face model (no row permutation).
fn peft_pairs(dir: &Path, scale: f64) -> BTreeMap<usize, LayerPairs> {
    let tensors =
        candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
            .expect("adapter tensors");
    let mut pairs: BTreeMap<usize, LayerPairs> = BTreeMap::new();
    for layer in 0..4 {
        for target in Target::ALL {
            let block = if matches!(target, Target::Gate | Target::Up | Target::Down) {
                "mlp"
            } else {
                "self_attn"
            };
            let name = |half: &str| {
                format!(
                    "base_model.model.model.layers.{layer}.{block}.{}.lora_{half}.weight",
                    target.module()
                )
            };
            if let (Some(a), Some(b)) = (tensors.get(&name("A")), tensors.get(&name("B"))) {
                let pair = LoraPair {
                    a: a.to_dtype(DType::F32).expect("f32"),
                    b: b.to_dtype(DType::F32).expect("f32"),
                    scale,
                };
                pairs.entry(layer).or_default().insert(target, pair);
            }
        }
    }
    pairs
}

#[test]
fn lora_pairs_give_peft_logits() {
    let dir = data("lora-head-tail");
    let golden: Golden = serde_json::from_str(
        &std::fs::read_to_string(dir.join("golden_logits.json")).expect("golden"),
    )
    .expect("parse golden");
    let source = ModelSource::open(&data("tiny-llama-hf")).expect("open");
    // r 4, alpha 8: scale 2.
    let pairs = peft_pairs(&dir, 2.0);
    assert_eq!(pairs.keys().copied().collect::<Vec<_>>(), vec![0, 3]);
    let logits = dense_logits(&source, &golden.input_ids, &pairs);
    assert_rows_close(&logits, &golden.logits, "peft");
}

/// Seeded trainable pairs (both halves non-zero, so that every gradient is) on every module of
/// `layers`.
fn random_vars(
    source: &ModelSource,
    layers: &[usize],
    seed: u64,
) -> BTreeMap<(usize, Target), [Var; 2]> {
    let mut rng = Rng::new(seed);
    let mut vars = BTreeMap::new();
    for &layer in layers {
        for target in Target::ALL {
            let [(_, a_shape), (_, b_shape)] = target.lora_matrices(layer, 2, source.config());
            let mut var = |shape: [usize; 2]| {
                let values: Vec<f32> = (0..shape[0] * shape[1]).map(|_| 0.1 * rng.unit()).collect();
                Var::from_tensor(
                    &Tensor::from_vec(values, (shape[0], shape[1]), &Device::Cpu).expect("t"),
                )
                .expect("var")
            };
            vars.insert((layer, target), [var(a_shape), var(b_shape)]);
        }
    }
    vars
}

fn pairs_of(vars: &BTreeMap<(usize, Target), [Var; 2]>) -> BTreeMap<usize, LayerPairs> {
    let mut pairs: BTreeMap<usize, LayerPairs> = BTreeMap::new();
    for (&(layer, target), [a, b]) in vars {
        let pair = LoraPair {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 2.0,
        };
        pairs.entry(layer).or_default().insert(target, pair);
    }
    pairs
}

const IDS: [u32; 9] = [1, 17, 200, 42, 5, 99, 311, 7, 64];

/// Mean cross-entropy of predicting each next token of [`IDS`].
fn loss(logits: &Tensor) -> Tensor {
    let n = IDS.len() - 1;
    let targets = Tensor::new(&IDS[1..], &Device::Cpu).expect("targets");
    candle_nn::loss::cross_entropy(&logits.narrow(0, 0, n).expect("narrow"), &targets)
        .expect("loss")
}

fn scalar(t: &Tensor) -> f32 {
    t.to_scalar::<f32>().expect("scalar")
}

fn assert_gradient_close(analytic: f32, numeric: f32, what: &str) {
    assert!(
        (analytic - numeric).abs() <= 1e-3 + 0.02 * analytic.abs(),
        "{what}: analytic {analytic}, finite difference {numeric}"
    );
}

/// Adds `delta` to element `index` of `var`.
fn nudge(var: &Var, index: usize, delta: f32) {
    let mut values: Vec<f32> = var
        .as_tensor()
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("v");
    values[index] += delta;
    let t = Tensor::from_vec(values, var.shape(), &Device::Cpu).expect("t");
    var.set(&t).expect("set");
}

#[test]
fn lora_gradients_match_finite_differences() {
    let source = ModelSource::open(&data("tiny-llama-hf")).expect("open");
    let vars = random_vars(&source, &[0, 3], 11);
    let value = |vars: &BTreeMap<(usize, Target), [Var; 2]>| {
        loss(&dense_logits(&source, &IDS, &pairs_of(vars)))
    };
    let grads = value(&vars).backward().expect("backward");
    let h = 1e-2;
    for (&(layer, target), pair) in &vars {
        for (half, var) in ["A", "B"].iter().zip(pair) {
            let grad: Vec<f32> = grads
                .get(var.as_tensor())
                .expect("a gradient")
                .flatten_all()
                .expect("flat")
                .to_vec1()
                .expect("values");
            // Two entries of each matrix: the first, and one in the middle.
            for index in [0, grad.len() / 2 + 1] {
                nudge(var, index, h);
                let up = scalar(&value(&vars));
                nudge(var, index, -2.0 * h);
                let down = scalar(&value(&vars));
                nudge(var, index, h);
                let numeric = (up - down) / (2.0 * h);
                let what = format!("layer {layer} {} {half}[{index}]", target.module());
                assert_gradient_close(grad[index], numeric, &what);
            }
        }
    }
}

#[test]
fn the_trunk_input_gradient_matches_finite_differences() {
    let source = Arc::new(ModelSource::open(&data("tiny-llama-hf")).expect("open"));
    let trunk = DenseTrunk::new(source.clone(), 1..3, usize::MAX).expect("trunk");
    let x = embed(&source, &IDS);
    let mut rng = Rng::new(5);
    let g: Vec<f32> = (0..x.elem_count()).map(|_| rng.unit()).collect();
    let g = Tensor::from_vec(g, x.shape(), &Device::Cpu).expect("g");
    // f(x) = Σ trunk(x) ⊙ g, whose gradient is what the backward pass returns.
    let f = |x: &Tensor| {
        scalar(
            &(trunk.forward(x).expect("forward").0 * &g)
                .unwrap()
                .sum_all()
                .unwrap(),
        )
    };
    let (_, activations) = trunk.forward(&x).expect("forward");
    let grad: Vec<f32> = trunk
        .backward(&activations, &g)
        .expect("backward")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("values");
    let values: Vec<f32> = x.flatten_all().expect("flat").to_vec1().expect("values");
    let h = 1e-2;
    let width = source.config().hidden_size;
    for index in [0, 3, width + 7, 4 * width + 33, values.len() - 1] {
        let at = |delta: f32| {
            let mut v = values.clone();
            v[index] += delta;
            Tensor::from_vec(v, x.shape(), &Device::Cpu).expect("x")
        };
        let numeric = (f(&at(h)) - f(&at(-h))) / (2.0 * h);
        assert_gradient_close(grad[index], numeric, &format!("x[{index}]"));
    }
}

/// The gradients of every variable, as bits.
fn grad_bits(
    grads: &[&candle_core::backprop::GradStore],
    vars: &BTreeMap<(usize, Target), [Var; 2]>,
) -> Vec<Vec<u32>> {
    vars.values()
        .flatten()
        .map(|var| {
            let grad = grads
                .iter()
                .find_map(|g| g.get(var.as_tensor()))
                .expect("a gradient");
            bits(&grad.flatten_all().expect("flat").to_vec1().expect("values"))
        })
        .collect()
}

#[test]
fn split_gradients_equal_the_unsplit_model_bit_for_bit() {
    let source = Arc::new(ModelSource::open(&data("tiny-llama-hf")).expect("open"));
    let vars = random_vars(&source, &[0, 3], 3);
    let pairs = pairs_of(&vars);
    let unsplit = loss(&dense_logits(&source, &IDS, &pairs));
    let expected = grad_bits(&[&unsplit.backward().expect("backward")], &vars);

    let pass = Pass::new(source.config(), IDS.len()).expect("pass");
    let layer = |i: usize| -> DenseLayer { source.dense_layer(i).expect("layer") };
    // Budget 0 keeps only the trunk's input: its second layer's input is recomputed. With a
    // weight cache, the layers of the backward pass are the forward pass's, kept.
    for (budget, cache) in [(usize::MAX, 0), (0, 0), (0, usize::MAX)] {
        let trunk = DenseTrunk::new(source.clone(), 1..3, budget)
            .expect("trunk")
            .with_weight_cache(cache);
        let head = layer(0)
            .forward(&embed(&source, &IDS), pairs.get(&0), &pass)
            .expect("head");
        let (rows, activations) = trunk.forward(&head.detach()).expect("trunk forward");
        let tail_in = Var::from_tensor(&rows).expect("var");
        let tail = layer(3)
            .forward(tail_in.as_tensor(), pairs.get(&3), &pass)
            .expect("tail");
        let logits = source
            .dense_output()
            .expect("output")
            .logits(&tail, &pass)
            .expect("logits");
        let split = loss(&logits);
        assert_eq!(scalar(&split).to_bits(), scalar(&unsplit).to_bits(), "loss");
        let tail_grads = split.backward().expect("tail backward");
        let g = trunk
            .backward(
                &activations,
                tail_grads.get(tail_in.as_tensor()).expect("row gradient"),
            )
            .expect("trunk backward");
        let head_grads = (head * g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .expect("head");
        assert_eq!(
            grad_bits(&[&tail_grads, &head_grads], &vars),
            expected,
            "budget {budget}, cache {cache}"
        );
    }
}

/// An adapter written for a GGUF model (its query and key rows in GGUF's order, as the training
/// pass holds them) goes to disk in Hugging Face's order and comes back where it was: the
/// inference path with it gives the training pass's logits.
#[test]
fn an_adapter_written_for_a_gguf_model_loads_back_onto_the_same_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.gguf");
    GgufModel::new(GgmlDType::F32, false, 9).write(&path);
    let source = ModelSource::open(&path).expect("open gguf");
    let vars = random_vars(&source, &[0, 3], 21);
    let shape = LoraShape {
        rank: 2,
        alpha: 4.0,
        rslora: false,
        targets: Target::ALL.to_vec(),
        layers: vec![0, 3],
    };
    let matrices = vars
        .iter()
        .map(|(&key, [a, b])| (key, (a.as_tensor().clone(), b.as_tensor().clone())))
        .collect();
    let adapter = dir.path().join("adapter");
    write_peft(
        &adapter,
        &shape,
        &matrices,
        source.config(),
        ModelFormat::Gguf,
    )
    .expect("write");
    let expected = dense_logits(&source, &IDS, &pairs_of(&vars));
    let mut adapted = ModelSource::open(&path).expect("open gguf");
    adapted.load_adapter(&adapter).expect("load");
    let inference = inference_logits(&adapted, &IDS);
    assert_rows_close(&expected, &inference, "gguf adapter");
    let base = inference_logits(&source, &IDS);
    assert!(
        max_abs_diff(&base[3], &inference[3]) > 1e-2,
        "the adapter moves the logits"
    );
}
