//! Steps that check drafted tokens give exactly the output of one-token steps, on the real
//! SmolLM2: greedy and sampled, unsplit, at a fixed split and at random split points with the
//! permutation, while the drafts that were kept cut the number of steps.

use std::sync::{Arc, OnceLock};

use candle_core::Device;
use lsplit_model::ModelSource;
use lsplit_split::{
    DeviceModel, GenerateOptions, Generation, LocalTrunk, Obfuscation, SamplingParams, Session,
    Speculate, SplitPolicy, load_tokenizer,
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

fn generate(
    model: &DeviceModel,
    obfuscation: Obfuscation,
    speculate: Speculate,
    sampling: SamplingParams,
) -> Generation {
    let prompt = model.prompt_tokens(REWRITE, false).expect("prompt");
    let options = GenerateOptions {
        max_tokens: TOKENS,
        sampling,
        ignore_eos: true,
        speculate,
    };
    let mut session = session(model, obfuscation);
    let generation = session
        .generate(&prompt, &options, &mut |_| {})
        .expect("generate");
    // The session holds what one-token steps would: the prompt and every token but the last.
    assert_eq!(session.position(), prompt.len() + TOKENS - 1);
    generation
}

fn assert_lookup_matches_off(model: &DeviceModel, obfuscation: Obfuscation, what: &str) {
    for sampling in [
        SamplingParams::default(),
        SamplingParams {
            temperature: 0.8,
            seed: 7,
            ..SamplingParams::default()
        },
    ] {
        let off = generate(model, obfuscation, Speculate::Off, sampling.clone());
        let lookup = generate(model, obfuscation, Speculate::Lookup, sampling.clone());
        assert_eq!(lookup.tokens, off.tokens, "{what}, {sampling:?}");
        assert_eq!(lookup.text, off.text, "{what}, {sampling:?}");
        assert_eq!(off.stats.decode_steps, TOKENS - 1);
        assert_eq!(off.stats.drafted_tokens, 0);
        let kept = lookup.stats.accepted_tokens;
        assert!(kept > 0, "{what}: lookup kept no drafted token");
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
