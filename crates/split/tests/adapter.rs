//! A device adapter through the device's own loop: with `lora-head-tail` (every module of
//! layers 0 and 3 of the tiny Hugging Face model, from `crates/model/tests/data`), split
//! sessions (fixed, and random draws with the permutation) give the unsplit session's logits bit
//! for bit at the prefill and at every greedy step, and a split whose trunk may run an adapted
//! layer is refused before anything runs, naming the layers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use lsplit_model::{ModelSource, PartKind, PartSpec, SplitPlan};
use lsplit_split::{DeviceModel, Obfuscation, Session, SplitError, SplitPolicy, load_tokenizer};
use lsplit_wire::Codec;

/// Greedy steps compared after the prefill.
const STEPS: usize = 12;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/data")
        .join(name)
}

fn source() -> ModelSource {
    let mut source = ModelSource::open(&data("tiny-llama-hf")).expect("open");
    source
        .load_adapter(&data("lora-head-tail"))
        .expect("adapter");
    source
}

fn split(source: &ModelSource, policy: SplitPolicy) -> Result<DeviceModel, SplitError> {
    let tokenizer = Arc::new(load_tokenizer(source).expect("tokenizer"));
    DeviceModel::split(source, policy, tokenizer, Codec::F32, &Device::Cpu)
}

/// The logits at the prefill of `prompt` and after each of `STEPS` greedy tokens.
fn run(session: &mut Session<'_>, prompt: &[u32]) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut logits = vec![session.forward(prompt).expect("prefill")];
    let mut tokens = Vec::new();
    for _ in 0..STEPS {
        let last = logits.last().expect("logits");
        let next = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]).then(b.cmp(&a)))
            .expect("vocabulary") as u32;
        tokens.push(next);
        logits.push(session.forward(&[next]).expect("step"));
    }
    (logits, tokens)
}

fn bits(rows: &[Vec<f32>]) -> Vec<Vec<u32>> {
    rows.iter()
        .map(|r| r.iter().map(|v| v.to_bits()).collect())
        .collect()
}

#[test]
fn split_sessions_with_a_device_adapter_equal_the_unsplit_session() {
    let source = source();
    let tokenizer = Arc::new(load_tokenizer(&source).expect("tokenizer"));
    let prompt = [1, 17, 42, 99, 5, 250, 3, 77];
    let unsplit = DeviceModel::unsplit(&source, tokenizer, &Device::Cpu).expect("unsplit");
    let (expected, tokens) = run(&mut unsplit.unsplit_session().expect("session"), &prompt);
    let plain = ModelSource::open(&data("tiny-llama-hf")).expect("open");
    let plain_tokenizer = Arc::new(load_tokenizer(&plain).expect("tokenizer"));
    let public = DeviceModel::unsplit(&plain, plain_tokenizer, &Device::Cpu).expect("unsplit");
    let (_, public_tokens) = run(&mut public.unsplit_session().expect("session"), &prompt);
    assert_ne!(
        tokens, public_tokens,
        "the adapter changes what is generated"
    );

    let policies = [
        (
            SplitPolicy::fixed(SplitPlan::new(1, 3, 4).expect("plan")),
            Obfuscation::None,
        ),
        (
            SplitPolicy::parse("1", "2,3", 4).expect("policy"),
            Obfuscation::Permute,
        ),
    ];
    for (policy, obfuscation) in policies {
        let label = format!("{policy}, {obfuscation}");
        let trunk = Arc::new(
            source
                .load_part(
                    &PartSpec {
                        kind: PartKind::Trunk,
                        layers: policy.trunk_layers(),
                    },
                    &Device::Cpu,
                )
                .expect("trunk"),
        );
        let model = split(&source, policy).expect("split");
        let mut session = model.local_session(&trunk, obfuscation).expect("session");
        let (logits, split_tokens) = run(&mut session, &prompt);
        assert_eq!(split_tokens, tokens, "{label}");
        assert!(bits(&logits) == bits(&expected), "{label}: logits differ");
    }
}

#[test]
fn a_split_whose_trunk_may_run_an_adapted_layer_is_refused() {
    let source = source();
    let cases = [
        (
            SplitPolicy::fixed(SplitPlan::new(0, 4, 4).expect("plan")),
            "[0, 3]",
            "0..4",
        ),
        (
            SplitPolicy::fixed(SplitPlan::new(1, 4, 4).expect("plan")),
            "[3]",
            "1..4",
        ),
        (
            SplitPolicy::parse("0,1", "2,3", 4).expect("policy"),
            "[0]",
            "0..3",
        ),
    ];
    for (policy, layers, trunk) in cases {
        let err = split(&source, policy).expect_err("refused");
        let expected = format!(
            "the adapter updates layers {layers}, which the trunk (layers {trunk}) runs: a \
             device adapter may only update the head's and the tail's layers"
        );
        assert!(err.to_string().ends_with(&expected), "{err}");
    }
}
