//! Sampling with drafted tokens keeps the model's distribution, tested statistically on a small
//! vocabulary: the tiny Hugging Face model (`crates/model/tests/data`), split 1:3, sampled with
//! top-k 2 so that each token has two candidates, drafts from a draft model (the tiny model
//! itself, drafting greedily, so that about half its drafts are kept). Over many seeds, the
//! sequences of four tokens sampled with drafts are compared with the model's own probability of
//! each sequence (the sampler's distribution at each step, from one-token steps of the unsplit
//! model) by Pearson's chi-square test at a significance level of 0.001. The seeds are fixed, so
//! the test is deterministic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use lsplit_model::{ModelSource, PartKind, PartSpec};
use lsplit_split::{
    DeviceModel, DraftModel, GenerateOptions, Obfuscation, Sampler, SamplingParams, Speculate,
    SplitPolicy, load_tokenizer,
};
use lsplit_wire::Codec;

/// Tokens generated per sample: the sequences tested.
const TOKENS: usize = 4;
/// Candidates per token: `TOP_K ^ TOKENS` = 16 possible sequences.
const TOP_K: usize = 2;
/// Generations, each with its own seed.
const SAMPLES: u64 = 3200;
/// The chi-square distribution's 0.999 quantile with 15 degrees of freedom (16 cells): a
/// correct sampler exceeds it with probability 0.001.
const CRITICAL: f64 = 37.697;
/// The prompt's token ids (BOS first).
const PROMPT: [u32; 6] = [1, 45, 97, 212, 18, 160];

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/data/tiny-llama-hf")
}

fn sampling(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_k: Some(TOP_K),
        seed,
        ..SamplingParams::default()
    }
}

/// The model's probability of every sequence of `TOKENS` tokens after the prompt, from the
/// unsplit model's one-token steps and the sampler's distribution at each.
fn expected(model: &DeviceModel) -> HashMap<Vec<u32>, f64> {
    let sampler = Sampler::new(sampling(0));
    let mut sequences = HashMap::from([(Vec::new(), 1.0)]);
    for _ in 0..TOKENS {
        let mut longer = HashMap::new();
        for (sequence, p) in sequences {
            let mut session = model.unsplit_session().expect("session");
            let mut history = PROMPT.to_vec();
            history.extend(&sequence);
            let logits = session.forward(&history).expect("forward");
            for (token, q) in sampler.distribution(&logits, &history) {
                let mut next = sequence.clone();
                next.push(token);
                longer.insert(next, p * q);
            }
        }
        sequences = longer;
    }
    sequences
}

#[test]
fn sampled_sequences_with_drafts_follow_the_models_distribution() {
    let source = ModelSource::open(&tiny()).expect("open");
    let tokenizer = Arc::new(load_tokenizer(&source).expect("tokenizer"));
    let unsplit =
        DeviceModel::unsplit(&source, Arc::clone(&tokenizer), &Device::Cpu).expect("unsplit");
    let expected = expected(&unsplit);
    assert_eq!(expected.len(), TOP_K.pow(TOKENS as u32));
    let smallest = expected.values().copied().fold(f64::INFINITY, f64::min);
    assert!(
        smallest * SAMPLES as f64 >= 5.0,
        "every sequence must be expected at least 5 times for the test to hold: {smallest}"
    );

    let policy = SplitPolicy::parse("1", "3", 4).expect("policy");
    let split =
        DeviceModel::split(&source, policy, tokenizer, Codec::F32, &Device::Cpu).expect("split");
    let draft = DraftModel::load(&tiny(), split.tokenizer(), &Device::Cpu).expect("draft model");
    let split = split.with_draft_model(draft);
    let spec = PartSpec {
        kind: PartKind::Trunk,
        layers: 1..3,
    };
    let trunk = Arc::new(source.load_part(&spec, &Device::Cpu).expect("trunk"));

    let mut observed = HashMap::<Vec<u32>, u64>::new();
    let (mut drafted, mut kept) = (0, 0);
    for seed in 0..SAMPLES {
        let options = GenerateOptions {
            max_tokens: TOKENS,
            sampling: sampling(seed),
            ignore_eos: true,
            speculate: Speculate::Draft,
        };
        let mut session = split
            .local_session(&trunk, Obfuscation::None)
            .expect("session");
        let generation = session
            .generate(&PROMPT, &options, &mut |_| {})
            .expect("generate");
        drafted += generation.stats.drafted_tokens;
        kept += generation.stats.accepted_tokens;
        *observed.entry(generation.tokens).or_default() += 1;
    }
    // Drafts were checked at every step but the last, and many were kept: the sequences went
    // through the drafted path.
    assert!(
        kept * 4 >= drafted && kept > 0,
        "kept {kept} of {drafted} drafts"
    );
    let impossible: Vec<_> = observed
        .keys()
        .filter(|s| !expected.contains_key(*s))
        .collect();
    assert!(
        impossible.is_empty(),
        "sequences the model cannot sample: {impossible:?}"
    );
    let chi_square: f64 = expected
        .iter()
        .map(|(sequence, p)| {
            let e = p * SAMPLES as f64;
            let o = observed.get(sequence).copied().unwrap_or(0) as f64;
            (o - e) * (o - e) / e
        })
        .sum();
    assert!(
        chi_square < CRITICAL,
        "chi-square {chi_square:.2} over {} sequences exceeds {CRITICAL} (p < 0.001)",
        expected.len()
    );
}
