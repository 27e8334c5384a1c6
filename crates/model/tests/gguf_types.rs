//! Every GGUF tensor type candle can quantize and multiply on the CPU: a synthetic llama is
//! written with its matrices in that type (tied and untied LM head), then
//! - our whole model's prompt logits are bit-identical to candle-transformers'
//!   `quantized_llama`'s (but for Q4_0, Q4K, Q5K and Q6K, whose blocks or super-blocks our
//!   kernels sum in integers, and Q8_0 on VNNI CPUs, where candle uses a repacked kernel of its
//!   own, below), and
//!   fed candle's 16 greedy tokens it chooses the same tokens with logits within 10% of the
//!   largest (measured: at most 3%, and 6% for the prompt in Q8_0,
//!   whose 256-wide rows candle multiplies with a kernel of its own on VNNI CPUs), and
//! - split runs (head → trunk → tail) give logits bit-identical to the unsplit run.
//!
//! RoPE scaling from GGUF (`llama.rope.scaling.type = linear`, `rope_freqs.weight`) is checked
//! to be applied.

mod common;

use std::path::Path;

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value;
use common::{
    GgufModel, HEAD_DIM, LAYERS, PROMPT, SplitRun, argmax, bits, candle_greedy, max_abs_diff,
    ours_forced, ours_greedy, qtensor,
};
use lsplit_model::{ModelSource, PartSpec, RopeScaling, SplitPlan};

/// Greedy tokens generated after the prompt.
const STEPS: usize = 16;

/// Decode steps at which splits are compared with the unsplit run (after the prefill).
const SPLIT_STEPS: usize = 5;

/// Splits run head → trunk → tail; their logits must be bit-identical to the whole model's at
/// the prefill and at the first [`SPLIT_STEPS`] decode steps (fed the whole model's greedy
/// tokens).
fn check_splits(source: &ModelSource, tokens: &[u32], whole_logits: &[Vec<f32>], label: &str) {
    let whole_logits = &whole_logits[..=SPLIT_STEPS];
    for (k1, k2) in [(0, 4), (1, 3), (2, 2), (4, 4)] {
        let plan = SplitPlan::new(k1, k2, LAYERS).expect("plan");
        let load = |spec: PartSpec| source.load_part(&spec, &Device::Cpu).expect("load part");
        let (head, trunk, tail) = (load(plan.head()), load(plan.trunk()), load(plan.tail()));
        let mut run = SplitRun::new(&head, &trunk, &tail);
        let mut logits = run.step(&PROMPT);
        for (step, expected) in whole_logits.iter().enumerate() {
            assert!(
                bits(&logits) == bits(expected),
                "{label} split {plan}: logits differ from the unsplit model at step {step} \
                 (max diff {})",
                max_abs_diff(&logits, expected)
            );
            if step + 1 < whole_logits.len() {
                logits = run.step(&[tokens[step]]);
            }
        }
    }
}

fn check_type(dtype: GgmlDType, seed: u64) {
    check_models(dtype, seed, |_| {});
}

/// [`check_type`] on the models of `dtype` after `edit` (which may change some tensors' types).
fn check_models(dtype: GgmlDType, seed: u64, edit: impl Fn(&mut GgufModel)) {
    for tied in [true, false] {
        let label = format!("{dtype:?} {}", if tied { "tied" } else { "untied" });
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.gguf");
        let mut model = GgufModel::new(dtype, tied, seed);
        edit(&mut model);
        model.write(&path);

        let source = ModelSource::open(&path).expect("open synthetic model");
        assert_eq!(source.config().tied_embeddings, tied, "{label}");
        let whole = source
            .part_tensors(&PartSpec::whole(LAYERS))
            .expect("part tensors");
        assert_eq!(whole.len(), 2 + 9 * LAYERS + usize::from(!tied), "{label}");
        let embd = whole
            .iter()
            .find(|r| r.name == "token_embd.weight")
            .expect("embeddings");
        assert_eq!(embd.dtype, format!("{dtype:?}").to_lowercase(), "{label}");

        let (tokens, ref_logits) = candle_greedy(&path, &PROMPT, STEPS);
        let logits = ours_forced(&source, &PROMPT, &tokens);
        // The prompt runs the same kernels' arithmetic and the same prefill attention:
        // bit-identical. Except Q8_0 on a CPU with VNNI (candle then multiplies these 256-wide
        // rows with its own repacked kernel, whose copy of the weights doubles their memory,
        // while we keep ours) and Q4_0, Q4K, Q5K and Q6K (our kernels sum each block or
        // super-block in integers, candle in eight float lanes); the bound below applies to
        // them as to the decode steps.
        let exact_sums = [
            GgmlDType::Q4_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ];
        if dtype != GgmlDType::Q8_0 && !exact_sums.contains(&dtype) {
            assert!(
                bits(&logits[0]) == bits(&ref_logits[0]),
                "{label}: prompt logits differ from candle-transformers by {}",
                max_abs_diff(&logits[0], &ref_logits[0])
            );
        }
        // Decode steps (fed candle's greedy tokens) use our single-row attention, whose sums
        // are ordered differently; re-quantization of each product's input can turn that into
        // a small visible difference (see candle_reference.rs). A step agrees when we choose
        // candle's token, or a token candle itself scores within that step's difference of its
        // choice (a near tie, which random weights make common: seen in Q5K's).
        let agree = logits
            .iter()
            .zip(tokens.iter().zip(&ref_logits))
            .filter(|(l, (t, r))| {
                let ours = argmax(l) as usize;
                ours == **t as usize || r[**t as usize] - r[ours] <= max_abs_diff(l, r)
            })
            .count();
        assert!(
            agree >= STEPS - 1,
            "{label}: greedy choice agrees at {agree} of {STEPS} steps"
        );
        for (step, (a, b)) in logits.iter().zip(&ref_logits).enumerate() {
            let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(a, b);
            assert!(
                diff <= 0.1 * scale,
                "{label}: step {step} logits differ from candle-transformers by {diff} \
                 (largest logit {scale})"
            );
        }
        let distinct: std::collections::BTreeSet<_> = tokens.iter().collect();
        assert!(
            distinct.len() > 1,
            "{label}: degenerate model repeats one token: {tokens:?}"
        );
        check_splits(&source, &tokens, &logits, &label);
    }
}

macro_rules! type_tests {
    ($($name:ident: $dtype:expr, $seed:expr;)*) => {$(
        #[test]
        fn $name() {
            check_type($dtype, $seed);
        }
    )*};
}

type_tests! {
    f32_weights: GgmlDType::F32, 1;
    f16_weights: GgmlDType::F16, 2;
    bf16_weights: GgmlDType::BF16, 3;
    q4_0_weights: GgmlDType::Q4_0, 4;
    q4_1_weights: GgmlDType::Q4_1, 5;
    q5_0_weights: GgmlDType::Q5_0, 6;
    q5_1_weights: GgmlDType::Q5_1, 7;
    q8_0_weights: GgmlDType::Q8_0, 8;
    q2k_weights: GgmlDType::Q2K, 10;
    q3k_weights: GgmlDType::Q3K, 11;
    q4k_weights: GgmlDType::Q4K, 12;
    q5k_weights: GgmlDType::Q5K, 13;
    q6k_weights: GgmlDType::Q6K, 14;
}

/// A Q4_K file as llama.cpp's Q4_K_M writes them: some matrices in Q6_K, and in Q5_0 or Q8_0
/// where a row is not a multiple of 256 (here: chosen matrices). Each matrix goes through the
/// kernels of its own type, in one model.
#[test]
fn mixed_types_like_q4_k_m() {
    check_models(GgmlDType::Q4K, 15, |model| {
        for (name, dtype) in [
            ("blk.0.attn_v.weight", GgmlDType::Q6K),
            ("blk.1.ffn_down.weight", GgmlDType::Q6K),
            ("blk.0.attn_q.weight", GgmlDType::Q5_0),
            ("blk.2.ffn_up.weight", GgmlDType::Q8_0),
            ("blk.3.attn_output.weight", GgmlDType::Q4_1),
        ] {
            let (_, tensor) = model
                .tensors
                .iter()
                .find(|(n, _)| n == name)
                .expect("a tensor of the model");
            let values = tensor.dequantize(&Device::Cpu).expect("dequantize");
            let requantized =
                candle_core::quantized::QTensor::quantize(&values, dtype).expect("quantize");
            model.set_tensor(name, requantized);
        }
    });
}

/// candle can quantize and write Q8_1 and Q8K (the types llama.cpp only uses for activations)
/// but its GGUF reader refuses them: opening works (only headers are read), loading a part
/// that needs such a tensor is a clean error naming the tensor, never a panic.
#[test]
fn types_candle_cannot_read_are_clean_errors() {
    for dtype in [GgmlDType::Q8_1, GgmlDType::Q8K] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.gguf");
        GgufModel::new(dtype, false, 21).write(&path);
        let source = ModelSource::open(&path).expect("headers are readable");
        let err = source
            .load_part(&PartSpec::whole(LAYERS), &Device::Cpu)
            .expect_err("unreadable type")
            .to_string();
        let expected = format!(
            "{}: malformed GGUF file: reading `token_embd.weight`: quantized type {dtype:?} is \
             not supported yet",
            path.display()
        );
        assert!(err.starts_with(&expected), "{err}");
        // The trunk holds only layers: it fails on the first layer matrix instead.
        let trunk = SplitPlan::new(1, 3, LAYERS).expect("plan").trunk();
        let err = source
            .load_part(&trunk, &Device::Cpu)
            .expect_err("unreadable type")
            .to_string();
        assert!(
            err.contains("reading `blk.1.attn_q.weight`: quantized type"),
            "{err}"
        );
    }
}

/// Logits after the prompt and 3 greedy steps of a whole model loaded from `path`.
fn logits_of(path: &Path) -> (ModelSource, Vec<Vec<f32>>) {
    let source = ModelSource::open(path).expect("open");
    let (_, all) = ours_greedy(&source, &PROMPT, 4);
    (source, all)
}

#[test]
fn gguf_rope_scaling_is_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, edit: &dyn Fn(&mut GgufModel)| {
        let mut model = GgufModel::new(GgmlDType::F32, true, 77);
        edit(&mut model);
        let path = dir.path().join(name);
        model.write(&path);
        path
    };
    let plain = write("plain.gguf", &|_| {});
    let linear = write("linear.gguf", &|m| {
        m.set_metadata(
            "llama.rope.scaling.type",
            Value::String("linear".to_string()),
        );
        m.set_metadata("llama.rope.scaling.factor", Value::F32(4.0));
    });
    let factors = |name: &str, value: f32| {
        write(name, &|m| {
            m.set_tensor(
                "rope_freqs.weight",
                qtensor(vec![value; HEAD_DIM / 2], &[HEAD_DIM / 2], GgmlDType::F32),
            )
        })
    };
    let freqs4 = factors("freqs4.gguf", 4.0);
    let freqs1 = factors("freqs1.gguf", 1.0);

    let (plain_source, plain_logits) = logits_of(&plain);
    let (linear_source, linear_logits) = logits_of(&linear);
    let (freqs4_source, freqs4_logits) = logits_of(&freqs4);
    let (_, freqs1_logits) = logits_of(&freqs1);
    assert_eq!(plain_source.config().rope_scaling, RopeScaling::None);
    assert_eq!(
        linear_source.config().rope_scaling,
        RopeScaling::Linear { factor: 4.0 }
    );
    assert_eq!(
        freqs4_source.config().rope_scaling,
        RopeScaling::Factors(vec![4.0; HEAD_DIM / 2])
    );
    // rope_freqs.weight is configuration, not a weight any part holds.
    assert!(
        freqs4_source
            .part_tensors(&PartSpec::whole(LAYERS))
            .expect("tensors")
            .iter()
            .all(|r| r.name != "rope_freqs.weight")
    );

    // Scaling changes the logits at every step: it is applied.
    for (step, (p, l)) in plain_logits.iter().zip(&linear_logits).enumerate() {
        let diff = max_abs_diff(p, l);
        assert!(
            diff > 1e-3,
            "step {step}: linear scaling changed nothing ({diff})"
        );
    }
    // Dividing every frequency by 4 is what linear scaling by 4 does, so both files give the
    // same bits; factors of 1 change nothing.
    assert_eq!(
        linear_logits.iter().map(|l| bits(l)).collect::<Vec<_>>(),
        freqs4_logits.iter().map(|l| bits(l)).collect::<Vec<_>>()
    );
    assert_eq!(
        plain_logits.iter().map(|l| bits(l)).collect::<Vec<_>>(),
        freqs1_logits.iter().map(|l| bits(l)).collect::<Vec<_>>()
    );
    let inv = linear_source.config().rope_inv_freq();
    let base = plain_source.config().rope_inv_freq();
    assert_eq!(inv.len(), HEAD_DIM / 2);
    for (s, b) in inv.iter().zip(&base) {
        assert_eq!(s.to_bits(), (b / 4.0).to_bits());
    }
}
