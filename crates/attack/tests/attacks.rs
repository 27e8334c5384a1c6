//! The attacks against real captures of SmolLM2-135M-Instruct sessions, in-process: on a fixed
//! unpermuted split, replay reads every generated token and vocabulary matching every token
//! that went up; the permutation does not stop vocabulary matching, which recovers the
//! permutation from the first matched row and then lets replay read every generated token
//! again; secret random split points do not stop it either (every boundary is tried).

use std::sync::{Arc, OnceLock};

use candle_core::{Device, Tensor};
use lsplit_attack::{
    Attacker, DecoderOptions, Knowledge, Options, Scores, corpus_tokens, template_prefix,
};
use lsplit_model::{ModelSource, PartKind, PartSpec, SplitPlan};
use lsplit_split::{
    CaptureWriter, CapturedMessage, DeviceModel, GenerateOptions, LocalTrunk, Obfuscation,
    Speculate, SplitPolicy, Way, load_tokenizer, read_capture,
};
use lsplit_wire::Codec;

const PROMPT: &str = "List three uses of copper.";
const MAX_TOKENS: usize = 10;
/// Tokens of [`PROMPT`] in the chat template.
const PROMPT_POSITIONS: usize = 36;
/// Prompt tokens of [`PROMPT`] the learned decoder reads at least, trained with
/// [`DECODER_STEPS`] from seed 7 (33 when measured): the 30 of the chat template and some of
/// the user's words, which its training text never holds in that order.
const MIN_DECODED: usize = 32;

fn source() -> &'static ModelSource {
    static SOURCE: OnceLock<ModelSource> = OnceLock::new();
    SOURCE.get_or_init(|| {
        let path = lsplit_fetch::ensure_default_model().expect("default model");
        ModelSource::open(&path).expect("open")
    })
}

fn attacker() -> &'static Attacker {
    static ATTACKER: OnceLock<Attacker> = OnceLock::new();
    ATTACKER.get_or_init(|| {
        Attacker::new(source(), 3, 1, &Device::Cpu, &mut |_, _| {}).expect("attacker")
    })
}

/// Generates greedily through `policy` (plain when fixed and unpermuted) and attacks the
/// capture with `knowledge`.
fn attack(policy: &SplitPolicy, obfuscation: Obfuscation, knowledge: Knowledge) -> (Scores, bool) {
    let (scores, permuted, _) = attack_with(policy, obfuscation, knowledge, PROMPT, Speculate::Off);
    (scores, permuted)
}

/// [`attack`] of a generation from `prompt` whose steps draft with `speculate`; also the
/// positions the capture's steps rewound.
fn attack_with(
    policy: &SplitPolicy,
    obfuscation: Obfuscation,
    knowledge: Knowledge,
    prompt: &str,
    speculate: Speculate,
) -> (Scores, bool, usize) {
    let captured = capture(policy, obfuscation, Codec::F32, prompt, speculate);
    let recovery = attacker()
        .run(&captured.messages, &knowledge)
        .expect("attack");
    (
        recovery.score(
            &captured.prompt,
            &captured.generated,
            0..captured.prompt.len(),
        ),
        recovery.permutation_recovered,
        captured.messages.iter().map(|m| m.rewind).sum(),
    )
}

/// A session's wire capture and its true tokens.
struct Captured {
    messages: Vec<CapturedMessage>,
    prompt: Vec<u32>,
    generated: Vec<u32>,
}

/// Generates greedily from `prompt` through `policy` with rows sent as `codec`, and reads the
/// wire capture back.
fn capture(
    policy: &SplitPolicy,
    obfuscation: Obfuscation,
    codec: Codec,
    prompt: &str,
    speculate: Speculate,
) -> Captured {
    let source = source();
    let tokenizer = Arc::new(load_tokenizer(source).expect("tokenizer"));
    let dir = tempfile::tempdir().expect("tempdir");
    let trunk_part = |layers| {
        Arc::new(
            source
                .load_part(
                    &PartSpec {
                        kind: PartKind::Trunk,
                        layers,
                    },
                    &Device::Cpu,
                )
                .expect("trunk"),
        )
    };
    let model = DeviceModel::split(source, policy.clone(), tokenizer, codec, &Device::Cpu)
        .expect("device model");
    let keys = model.new_keys(obfuscation).expect("keys");
    let trunk = LocalTrunk::new(trunk_part(policy.trunk_layers()), &keys).expect("trunk");
    let mut session = model.session(Box::new(trunk), &keys).expect("session");
    session.capture(CaptureWriter::create(dir.path()).expect("capture"));
    let prompt = model.prompt_tokens(prompt, false).expect("prompt");
    let options = GenerateOptions {
        max_tokens: MAX_TOKENS,
        speculate,
        ..GenerateOptions::default()
    };
    let generation = session
        .generate(&prompt, &options, &mut |_| {})
        .expect("generate");
    assert_eq!(generation.tokens.len(), MAX_TOKENS);
    drop(session);
    Captured {
        messages: read_capture(dir.path()).expect("read capture"),
        prompt,
        generated: generation.tokens,
    }
}

/// [`capture`] of [`PROMPT`] through the fixed split 2:28, without drafts.
fn fixed_capture(obfuscation: Obfuscation, codec: Codec) -> Captured {
    let policy = SplitPolicy::fixed(SplitPlan::new(2, 28, 30).expect("plan"));
    capture(&policy, obfuscation, codec, PROMPT, Speculate::Off)
}

fn known(k1: usize, k2: usize) -> Knowledge {
    Knowledge {
        k1: Some(k1),
        k2: Some(k2),
        max_k: 3,
        budget: usize::MAX,
    }
}

#[test]
fn replay_reads_every_generated_token_of_a_fixed_unpermuted_split() {
    let policy = SplitPolicy::fixed(SplitPlan::new(2, 28, 30).expect("plan"));
    let (s, permuted) = attack(&policy, Obfuscation::None, known(2, 28));
    assert!(!permuted);
    assert_eq!(s.replay.generated, MAX_TOKENS, "{s:?}");
    assert_eq!(s.replay.generated_total, MAX_TOKENS);
    assert_eq!(s.matching.prompt, s.matching.prompt_total, "{s:?}");
    // The last generated token never goes up: generation stops once it is sampled.
    assert_eq!(s.matching.generated, MAX_TOKENS - 1, "{s:?}");
    assert!(
        s.lens.prompt < s.matching.prompt,
        "the baseline is weaker: {s:?}"
    );
}

#[test]
fn matching_tries_every_boundary_when_the_split_points_are_secret() {
    let policy = SplitPolicy::random(&[1, 2, 3], &[27, 28, 29], 30).expect("policy");
    let unknown = Knowledge {
        k1: None,
        k2: None,
        max_k: 3,
        budget: usize::MAX,
    };
    let (s, permuted) = attack(&policy, Obfuscation::None, unknown);
    assert!(!permuted);
    assert_eq!(s.matching.prompt, s.matching.prompt_total, "{s:?}");
    assert_eq!(s.matching.generated, MAX_TOKENS - 1, "{s:?}");
}

#[test]
fn the_permutation_is_recovered_by_matching_sorted_values() {
    let policy = SplitPolicy::fixed(SplitPlan::new(2, 28, 30).expect("plan"));
    let (s, permuted) = attack(&policy, Obfuscation::Permute, known(2, 28));
    assert!(permuted, "{s:?}");
    assert_eq!(s.replay.generated, MAX_TOKENS, "{s:?}");
    assert_eq!(s.matching.prompt, s.matching.prompt_total, "{s:?}");
    assert_eq!(s.matching.generated, MAX_TOKENS - 1, "{s:?}");
}

/// Drafted steps send rows of tokens the device then rejects; the attack follows the steps'
/// rewinds and still reads every token from the rows that were kept.
#[test]
fn matching_follows_the_rewinds_of_drafted_steps() {
    let policy = SplitPolicy::fixed(SplitPlan::new(2, 28, 30).expect("plan"));
    let prompt = "Rewrite politely: send me the bank PIN 4921 now, and tell Aiko to send me the \
                  bank PIN 4921 now.";
    let (s, _, rewound) = attack_with(
        &policy,
        Obfuscation::None,
        known(2, 28),
        prompt,
        Speculate::Lookup,
    );
    assert!(rewound > 0, "no drafted token was rejected");
    assert_eq!(s.matching.prompt, s.matching.prompt_total, "{s:?}");
    assert!(s.matching.generated >= MAX_TOKENS - 1, "{s:?}");
    assert_eq!(s.replay.generated, MAX_TOKENS, "{s:?}");
}

/// The guess at each position is the nearest candidate tried: stopping at the first row
/// reproduced to rounding gives the same guesses as trying every candidate of the budget, on
/// rows sent in every codec, and matching reads the text back from each.
#[test]
fn the_early_exit_gives_the_argmin_of_every_candidate_tried() {
    let budget = Knowledge {
        budget: 96,
        ..known(2, 28)
    };
    let exhaustive = Options {
        exhaustive: true,
        ..Options::default()
    };
    for codec in Codec::ALL {
        let captured = fixed_capture(Obfuscation::None, codec);
        let early = attacker().run(&captured.messages, &budget).expect("attack");
        let every = attacker()
            .run_with(&captured.messages, &budget, &exhaustive)
            .expect("attack");
        assert_eq!(early.matching, every.matching, "{codec}");
        let s = every.score(
            &captured.prompt,
            &captured.generated,
            0..captured.prompt.len(),
        );
        // The budget is small for speed: a few template tokens rank beyond it.
        assert!(s.matching.prompt >= 30, "{codec}: {s:?}");
        assert_eq!(s.matching.generated, MAX_TOKENS - 1, "{codec}: {s:?}");
        // Rounded rows are not mistaken for permuted ones, so replay reads them too.
        assert!(!every.permutation_recovered, "{codec}");
        assert_eq!(s.replay.generated, MAX_TOKENS, "{codec}: {s:?}");
    }
}

/// Once matching has recovered the permutation, the logit lens reads unpermuted rows: it
/// guesses exactly what it guesses without the permutation.
#[test]
fn the_logit_lens_reads_rows_unpermuted_once_the_permutation_is_recovered() {
    let lens = |obfuscation| {
        let captured = fixed_capture(obfuscation, Codec::F32);
        let recovery = attacker()
            .run(&captured.messages, &known(2, 28))
            .expect("attack");
        assert!(recovery.permutation_recovered == (obfuscation == Obfuscation::Permute));
        recovery.lens
    };
    let plain = lens(Obfuscation::None);
    assert_eq!(plain.len(), PROMPT_POSITIONS + MAX_TOKENS - 1);
    assert_eq!(lens(Obfuscation::Permute), plain);
}

/// Downlink inversion reads the prompt back from the rows coming down, which replay (reading
/// the next token) mostly cannot.
#[test]
fn downlink_inversion_reads_the_prompt_from_the_rows_coming_back() {
    let captured = fixed_capture(Obfuscation::None, Codec::F32);
    let knowledge = Knowledge {
        budget: 32,
        ..known(2, 28)
    };
    let recovery = attacker()
        .run(&captured.messages, &knowledge)
        .expect("attack");
    let s = recovery.score(
        &captured.prompt,
        &captured.generated,
        0..captured.prompt.len(),
    );
    // 21 of 36 and 6 of 10 when measured, against replay's 13 prompt tokens.
    assert!(s.inversion.prompt > s.replay.prompt, "{s:?}");
    assert!(s.inversion.generated > 0, "{s:?}");
}

/// A deterministic random rotation of `n` dimensions: Gram-Schmidt on pseudo-random columns.
fn rotation(n: usize) -> Tensor {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let mut basis: Vec<Vec<f64>> = Vec::with_capacity(n);
    while basis.len() < n {
        let mut v: Vec<f64> = (0..n).map(|_| next()).collect();
        for b in &basis {
            let dot: f64 = v.iter().zip(b).map(|(x, y)| x * y).sum();
            v.iter_mut().zip(b).for_each(|(x, y)| *x -= dot * y);
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        basis.push(v.into_iter().map(|x| x / norm).collect());
    }
    let values: Vec<f32> = basis.concat().into_iter().map(|x| x as f32).collect();
    Tensor::from_vec(values, (n, n), &Device::Cpu).expect("rotation")
}

/// The known-plaintext attack learns its map from the chat template's opening: without a
/// defence it reads what plain matching reads, and it sees through a fixed random rotation
/// of the uplink rows, which plain matching cannot.
#[test]
fn the_known_plaintext_attack_sees_through_a_rotation_of_the_rows() {
    let captured = fixed_capture(Obfuscation::None, Codec::F32);
    let tokenizer = load_tokenizer(source()).expect("tokenizer");
    let options = Options {
        known_prefix: template_prefix(&tokenizer).expect("template"),
        ..Options::default()
    };
    let prefix = options.known_prefix.len();
    assert!(prefix > 10 && prefix < PROMPT_POSITIONS, "{prefix}");
    let score = |messages: &[CapturedMessage], knowledge: &Knowledge| {
        attacker()
            .run_with(messages, knowledge, &options)
            .expect("attack")
            .score(
                &captured.prompt,
                &captured.generated,
                0..captured.prompt.len(),
            )
    };
    let s = score(&captured.messages, &known(2, 28));
    assert!(s.known_plaintext.prompt >= s.matching.prompt, "{s:?}");
    assert!(s.known_plaintext.generated >= s.matching.generated, "{s:?}");
    let q = rotation(576);
    let rotated: Vec<CapturedMessage> = captured
        .messages
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if m.direction == Way::Up {
                let rows = m.rows.decode(&Device::Cpu).expect("decode");
                let turned = rows.matmul(&q).expect("rotate");
                m.rows = Codec::F32.encode(&turned, m.rows.start).expect("encode");
            }
            m
        })
        .collect();
    // Plain matching finds no row it reproduces and would try the whole vocabulary: a budget.
    let budget = Knowledge {
        budget: 64,
        ..known(2, 28)
    };
    let s = score(&rotated, &budget);
    assert!(s.matching.prompt < prefix / 2, "{s:?}");
    assert_eq!((s.matching.generated, s.lens.prompt), (0, 0), "{s:?}");
    // The few misses are the budget's: plain matching of the undistorted rows misses as many
    // with 64 candidates.
    assert!(s.known_plaintext.prompt >= 33, "{s:?}");
    assert!(s.known_plaintext.generated >= 7, "{s:?}");
}

/// Optimizer steps of the learned decoder in the tests: fewer than the command's default, for
/// speed.
const DECODER_STEPS: usize = 300;

/// A fresh attacker 2 layers deep with a learned decoder for K1 = 2, trained from `seed` on
/// the attacker's own corpus with `steps`.
fn decoding_attacker(seed: u64) -> Attacker {
    let tokenizer = load_tokenizer(source()).expect("tokenizer");
    let mut attacker =
        Attacker::new(source(), 2, 1, &Device::Cpu, &mut |_, _| {}).expect("attacker");
    let texts = corpus_tokens(&tokenizer).expect("corpus");
    let options = DecoderOptions {
        steps: DECODER_STEPS,
        seed,
    };
    attacker
        .train_decoder(&texts, &known(2, 28), &options, &mut |_, _| {})
        .expect("decoder");
    attacker
}

/// The learned decoder, trained only on rows the attacker made from its own text (none of it
/// this prompt), reads most of an undefended prompt from the capture alone; the same seed
/// trains the same decoder, so the guesses repeat.
#[test]
fn the_learned_decoder_reads_a_prompt_it_never_saw_and_repeats_from_its_seed() {
    let captured = fixed_capture(Obfuscation::None, Codec::F32);
    let guesses = |attacker: &Attacker| {
        attacker
            .run(&captured.messages, &known(2, 28))
            .expect("attack")
    };
    let first = guesses(&decoding_attacker(7));
    assert_eq!(first.decoder.len(), PROMPT_POSITIONS + MAX_TOKENS - 1);
    let s = first.score(
        &captured.prompt,
        &captured.generated,
        0..captured.prompt.len(),
    );
    assert!(s.decoder.prompt >= MIN_DECODED, "{s:?}");
    assert_eq!(guesses(&decoding_attacker(7)).decoder, first.decoder);
    // Without a decoder for the boundary the capture's K1 names, none is guessed.
    assert!(
        attacker()
            .run(&captured.messages, &known(2, 28))
            .expect("attack")
            .decoder
            .is_empty()
    );
}

/// Bad input gets a clear error: a K1 deeper than the attacker reaches, no training text, an
/// empty capture.
#[test]
fn the_learned_decoder_refuses_bad_input() {
    let mut attacker =
        Attacker::new(source(), 2, 1, &Device::Cpu, &mut |_, _| {}).expect("attacker");
    let options = DecoderOptions { steps: 1, seed: 0 };
    let err = attacker
        .train_decoder(&[vec![1, 2]], &known(5, 25), &options, &mut |_, _| {})
        .expect_err("too deep");
    assert_eq!(
        err.to_string(),
        "K1 = 5 is deeper than the attack's --max-k 2"
    );
    let err = attacker
        .train_decoder(&[Vec::new()], &known(2, 28), &options, &mut |_, _| {})
        .expect_err("no text");
    assert_eq!(
        err.to_string(),
        "the decoder's training text holds no tokens"
    );
    let err = attacker.run(&[], &known(2, 28)).expect_err("empty capture");
    assert_eq!(
        err.to_string(),
        "the capture holds 0 uplink and 0 downlink positions"
    );
}

#[test]
fn the_users_text_is_the_prompt_between_the_chat_templates_public_tokens() {
    let tokenizer = load_tokenizer(source()).expect("tokenizer");
    let messages = [lsplit_tokenizer::ChatMessage::new("user", PROMPT)];
    let templated = tokenizer
        .apply_chat_template(&messages, true)
        .expect("template");
    let tokens = tokenizer.encode(&templated, false).expect("encode");
    assert_eq!(tokens.len(), PROMPT_POSITIONS);
    let user = lsplit_attack::user_text(&tokenizer, &tokens).expect("user text");
    assert_eq!(user, 24..30);
    assert_eq!(tokenizer.decode(&tokens[user]).expect("decode"), PROMPT);
    // A raw prompt (no template) is the user's text throughout.
    let raw = tokenizer.encode(PROMPT, true).expect("encode");
    assert_eq!(
        lsplit_attack::user_text(&tokenizer, &raw).expect("user text"),
        0..raw.len()
    );
}
