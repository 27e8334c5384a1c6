//! Steps that check drafted tokens give exactly the output of one-token steps, on the real
//! SmolLM2: greedy and sampled, unsplit, at a fixed split and at random split points with the
//! permutation, while the drafts that were kept cut the number of steps; for every source
//! (prompt lookup, lookahead decoding, early exit, a draft model).

use std::sync::{Arc, OnceLock};

use candle_core::Device;
use lsplit_model::ModelSource;
use lsplit_split::{
    DeviceModel, DraftModel, GenerateOptions, Generation, LocalTrunk, Obfuscation, SamplingParams,
    Session, Speculate, SplitError, SplitPolicy, load_tokenizer,
};
use lsplit_wire::Codec;

/// A rewrite request: its answer repeats much of the prompt, which prompt lookup drafts.
const REWRITE: &str = "<|im_start|>user\nRepeat this sentence exactly: the quick brown fox \
                       jumps over the lazy dog near the old river bank.<|im_end|>\n\
                       <|im_start|>assistant\n";
const TOKENS: usize = 32;

fn source() -> &'static ModelSource {
    static SOURCE: OnceLock<ModelSource> = OnceLock::new();
    SOURCE.get_or_init(|| {
        let path = lsplit_fetch::ensure_default_model().expect("the default model");
        ModelSource::open(&path).expect("open the model")
    })
}

fn model(policy: Option<SplitPolicy>) -> DeviceModel {
    let source = source();
    let tokenizer = Arc::new(load_tokenizer(source).expect("tokenizer"));
    match policy {
        None => DeviceModel::unsplit(source, tokenizer, &Device::Cpu).expect("unsplit"),
        Some(policy) => {
            DeviceModel::split(source, policy, tokenizer, Codec::F32, &Device::Cpu).expect("split")
        }
    }
}

fn session<'m>(model: &'m DeviceModel, obfuscation: Obfuscation) -> Session<'m> {
    let Some(layers) = model.trunk_layers() else {
        return model.unsplit_session().expect("session");
    };
    let spec = lsplit_model::PartSpec {
        kind: lsplit_model::PartKind::Trunk,
        layers,
    };
    let part = source().load_part(&spec, &Device::Cpu).expect("trunk");
    let keys = model.new_keys(obfuscation).expect("keys");
    let trunk = LocalTrunk::new(Arc::new(part), &keys).expect("trunk session");
    model.session(Box::new(trunk), &keys).expect("session")
}

/// The default model as its own draft model.
fn with_draft(model: DeviceModel) -> DeviceModel {
    let path = lsplit_fetch::ensure_default_model().expect("the default model");
    let draft = DraftModel::load(&path, model.tokenizer(), &Device::Cpu).expect("draft model");
    model.with_draft_model(draft)
}

fn generate(
    model: &DeviceModel,
    obfuscation: Obfuscation,
    speculate: Speculate,
    sampling: SamplingParams,
) -> Generation {
    try_generate(model, obfuscation, speculate, sampling).expect("generate")
}

fn try_generate(
    model: &DeviceModel,
    obfuscation: Obfuscation,
    speculate: Speculate,
    sampling: SamplingParams,
) -> Result<Generation, SplitError> {
    let prompt = model.prompt_tokens(REWRITE, false).expect("prompt");
    let options = GenerateOptions {
        max_tokens: TOKENS,
        sampling,
        ignore_eos: true,
        speculate,
    };
    let mut session = session(model, obfuscation);
    let generation = session.generate(&prompt, &options, &mut |_| {})?;
    // The session holds what one-token steps would: the prompt and every token but the last.
    assert_eq!(session.position(), prompt.len() + TOKENS - 1);
    Ok(generation)
}

fn assert_lookup_matches_off(model: &DeviceModel, obfuscation: Obfuscation, what: &str) {
    assert_source_matches_off(model, obfuscation, Speculate::Lookup, what);
}

/// `speculate` gives exactly the output of one-token steps, greedy and sampled, in one step
/// fewer for every drafted token kept. Lookup and the draft model (the model itself) keep
/// some on the rewrite prompt; early exit, which skips most layers, may keep none.
fn assert_source_matches_off(
    model: &DeviceModel,
    obfuscation: Obfuscation,
    speculate: Speculate,
    what: &str,
) {
    for sampling in [
        SamplingParams::default(),
        SamplingParams {
            temperature: 0.8,
            seed: 7,
            ..SamplingParams::default()
        },
    ] {
        let off = generate(model, obfuscation, Speculate::Off, sampling.clone());
        let lookup = generate(model, obfuscation, speculate, sampling.clone());
        assert_eq!(lookup.tokens, off.tokens, "{what}, {sampling:?}");
        assert_eq!(lookup.text, off.text, "{what}, {sampling:?}");
        assert_eq!(off.stats.decode_steps, TOKENS - 1);
        assert_eq!(off.stats.drafted_tokens, 0);
        let kept = lookup.stats.accepted_tokens;
        assert!(
            lookup.stats.drafted_tokens > 0,
            "{what}: {speculate} drafted nothing"
        );
        if speculate != Speculate::EarlyExit {
            assert!(kept > 0, "{what}: {speculate} kept no drafted token");
        }
        assert_eq!(lookup.stats.decode_steps, TOKENS - 1 - kept, "{what}");
        assert_eq!(lookup.stats.decode_tokens, TOKENS - 1, "{what}");
    }
}

#[test]
fn drafted_steps_give_the_unsplit_output() {
    assert_lookup_matches_off(&model(None), Obfuscation::None, "unsplit");
}

#[test]
fn drafted_steps_give_the_fixed_split_output() {
    let policy = SplitPolicy::parse("2", "28", 30).expect("policy");
    assert_lookup_matches_off(&model(Some(policy)), Obfuscation::None, "2:28");
}

#[test]
fn drafted_steps_give_the_random_split_output_with_the_permutation() {
    let policy = SplitPolicy::parse("1,2,3", "27,28,29", 30).expect("policy");
    assert_lookup_matches_off(&model(Some(policy)), Obfuscation::Permute, "random");
}

#[test]
fn early_exit_drafts_give_the_fixed_split_output() {
    let policy = SplitPolicy::parse("4", "26", 30).expect("policy");
    let model = model(Some(policy));
    assert_source_matches_off(&model, Obfuscation::None, Speculate::EarlyExit, "4:26");
}

#[test]
fn early_exit_drafts_give_the_random_split_output_with_the_permutation() {
    let policy = SplitPolicy::parse("1,2,3", "27,28,29", 30).expect("policy");
    let model = model(Some(policy));
    assert_source_matches_off(&model, Obfuscation::Permute, Speculate::EarlyExit, "random");
}

#[test]
fn a_draft_model_gives_the_output_of_one_token_steps_unsplit_and_split() {
    assert_source_matches_off(
        &with_draft(model(None)),
        Obfuscation::None,
        Speculate::Draft,
        "unsplit",
    );
    let policy = SplitPolicy::parse("1,2,3", "27,28,29", 30).expect("policy");
    let split = with_draft(model(Some(policy)));
    assert_source_matches_off(&split, Obfuscation::Permute, Speculate::Draft, "random");
    // The model drafting for itself greedily: nearly every draft is kept.
    let greedy = generate(
        &split,
        Obfuscation::None,
        Speculate::Draft,
        SamplingParams::default(),
    );
    let stats = &greedy.stats;
    assert!(
        stats.accepted_tokens * 10 >= stats.drafted_tokens * 9,
        "kept {} of {} drafts",
        stats.accepted_tokens,
        stats.drafted_tokens
    );
}

#[test]
fn lookahead_gives_the_output_of_one_token_steps_unsplit_and_split() {
    assert_source_matches_off(
        &model(None),
        Obfuscation::None,
        Speculate::Lookahead,
        "unsplit",
    );
    let policy = SplitPolicy::parse("1,2,3", "27,28,29", 30).expect("policy");
    let split = model(Some(policy));
    assert_source_matches_off(&split, Obfuscation::Permute, Speculate::Lookahead, "random");
}

#[test]
fn sources_the_session_lacks_are_refused_with_the_reason() {
    let unsplit = model(None);
    let sampling = SamplingParams::default();
    let err = try_generate(
        &unsplit,
        Obfuscation::None,
        Speculate::EarlyExit,
        sampling.clone(),
    )
    .expect_err("early exit without a split");
    assert_eq!(
        err.to_string(),
        "--speculate early-exit sends the head's output straight to the tail: it needs a split"
    );
    let err = try_generate(&unsplit, Obfuscation::None, Speculate::Draft, sampling)
        .expect_err("draft without a draft model");
    assert_eq!(
        err.to_string(),
        "--speculate draft needs a draft model (--draft-model PATH)"
    );
}

#[test]
fn a_draft_model_with_another_tokenizer_is_refused() {
    let tiny =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/data/tiny-llama-hf");
    let smol = model(None);
    let err = DraftModel::load(&tiny, smol.tokenizer(), &Device::Cpu).expect_err("refused");
    let message = err.to_string();
    assert!(
        message.starts_with("draft model: its tokenizer has ")
            && message.ends_with(
                " tokens but the model's has 49152: a draft model needs the model's tokenizer"
            ),
        "{message}"
    );
}
