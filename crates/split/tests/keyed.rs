//! Keyed sessions on the real SmolLM2-135M-Instruct (Q4_1 GGUF, L = 30): split points drawn per
//! step from a session secret (K1 in {1,2,3,4}, K2 in {26,...,29}), KV catch-up between parts,
//! and the secret permutation of the hidden dimension. With the lossless f32 codec they compute
//! exactly what the unsplit model computes: logits are compared bit for bit at every step.
//!
//! Also: any disagreement between device and trunk (another secret, a repeated or skipped
//! step, a moved downlink) is an error naming the desync, never silent garbage; a capture holds
//! exactly the bytes the counters count.

mod common;

use common::{argmax, bits};

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use candle_core::Device;
use lsplit_model::{ModelPart, ModelSource, PartKind, PartSpec};
use lsplit_split::{
    CaptureWriter, DeviceModel, DividedTrunk, GenerateOptions, Hop, LocalTrunk, Obfuscation,
    SessionKeys, SessionSecret, SplitPolicy, StepRows, Trunk, TrunkError, Way, load_tokenizer,
    read_capture,
};
use lsplit_wire::Codec;

const LAYERS: usize = 30;
const HIDDEN: usize = 576;
/// Greedy tokens compared.
const GENERATED: usize = 20;

struct Fixture {
    source: ModelSource,
    unsplit: DeviceModel,
    keyed: DeviceModel,
    trunk: Arc<ModelPart>,
    policy: SplitPolicy,
    prompt: Vec<u32>,
    /// The unsplit model's greedy tokens.
    tokens: Vec<u32>,
    /// Its logits at the prefill and after each greedy token.
    logits: Vec<Vec<u32>>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path = lsplit_fetch::ensure_default_model().expect("fetch the default model");
        let source = ModelSource::open(&path).expect("open the default model");
        let tokenizer = Arc::new(load_tokenizer(&source).expect("tokenizer"));
        let unsplit =
            DeviceModel::unsplit(&source, tokenizer.clone(), &Device::Cpu).expect("unsplit model");
        let policy = SplitPolicy::random(&[1, 2, 3, 4], &[26, 27, 28, 29], LAYERS).expect("policy");
        let keyed =
            DeviceModel::split(&source, policy.clone(), tokenizer, Codec::F32, &Device::Cpu)
                .expect("keyed head and tail");
        assert_eq!(keyed.trunk_layers(), Some(1..29));
        let parts = keyed.parts();
        assert_eq!(
            parts[0].spec().layers,
            0..4,
            "the head holds the deepest K1"
        );
        assert_eq!(
            parts[1].spec().layers,
            26..30,
            "the tail holds from the shallowest K2"
        );
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
        let prompt = unsplit
            .prompt_tokens(
                "Name three rivers of Europe and say where they flow.",
                false,
            )
            .expect("prompt");
        let mut session = unsplit.unsplit_session().expect("unsplit session");
        let mut logits = vec![session.forward(&prompt).expect("prefill")];
        let mut tokens = Vec::new();
        for _ in 0..GENERATED {
            let next = argmax(logits.last().expect("logits"));
            tokens.push(next);
            logits.push(session.forward(&[next]).expect("decode"));
        }
        Fixture {
            source,
            unsplit,
            keyed,
            trunk,
            policy,
            prompt,
            tokens,
            logits: logits.iter().map(|l| bits(l)).collect(),
        }
    })
}

fn keys(seed: u8, obfuscation: Obfuscation) -> SessionKeys {
    SessionKeys {
        policy: fixture().policy.clone(),
        obfuscation,
        secret: SessionSecret::from_bytes([seed; 32]),
    }
}

fn local(keys: &SessionKeys) -> Box<dyn Trunk> {
    Box::new(LocalTrunk::new(fixture().trunk.clone(), keys).expect("keyed trunk"))
}

/// Runs the prompt and the reference's greedy tokens through a keyed session and compares every
/// step's logits with the unsplit model's, bit for bit. Returns the session's stats.
fn check_exact(keys: &SessionKeys) -> lsplit_split::Stats {
    check_exact_through(keys, local(keys))
}

/// [`check_exact`] with the session's trunk `trunk`.
fn check_exact_through(keys: &SessionKeys, trunk: Box<dyn Trunk>) -> lsplit_split::Stats {
    let f = fixture();
    let mut s = f.keyed.session(trunk, keys).expect("keyed session");
    let mut logits = s.forward(&f.prompt).expect("prefill");
    for (step, expected) in f.logits.iter().enumerate() {
        assert!(
            bits(&logits) == *expected,
            "logits differ from the unsplit model at step {step}"
        );
        if let Some(&next) = f.tokens.get(step) {
            logits = s.forward(&[next]).expect("decode step");
        }
    }
    s.stats().clone()
}

#[test]
fn random_split_points_compute_exactly_what_the_unsplit_model_does() {
    let f = fixture();
    let positions = (f.prompt.len() + GENERATED) as u64;
    let mut catch_up = 0;
    for seed in [1, 2, 3] {
        let stats = check_exact(&keys(seed, Obfuscation::None));
        // Every position crossed at least once each way, and catch-up rows cross again.
        let expected = (positions + stats.catch_up_rows_up) * HIDDEN as u64 * 4;
        assert_eq!(stats.bytes_up, expected, "seed {seed}");
        let expected = (positions + stats.catch_up_rows_down) * HIDDEN as u64 * 4;
        assert_eq!(stats.bytes_down, expected, "seed {seed}");
        assert!(
            stats.layer_rows > positions * LAYERS as u64,
            "catch-up recomputes some layers"
        );
        catch_up += stats.catch_up_rows_up + stats.catch_up_rows_down;
    }
    assert!(catch_up > 0, "the draws made the parts catch up");
}

#[test]
fn permuted_random_split_is_exact_too() {
    check_exact(&keys(4, Obfuscation::Permute));
}

/// The in-process trunk session of `keys` over layers `layers` only.
fn hop(keys: &SessionKeys, layers: Range<usize>, first: bool, last: bool) -> Hop {
    let spec = PartSpec {
        kind: PartKind::Trunk,
        layers: layers.clone(),
    };
    let part = Arc::new(
        fixture()
            .source
            .load_part(&spec, &Device::Cpu)
            .expect("hop"),
    );
    let keys = keys.for_hop(layers, first, last).expect("hop keys");
    let trunk = Box::new(LocalTrunk::new(part, &keys).expect("hop session"));
    Hop { trunk, keys }
}

#[test]
fn a_trunk_divided_over_three_hops_is_exact_with_random_points_and_the_permutation() {
    let keys = keys(6, Obfuscation::Permute);
    let hops = vec![
        hop(&keys, 1..10, true, false),
        hop(&keys, 10..20, false, false),
        hop(&keys, 20..29, false, true),
    ];
    let divided = DividedTrunk::new(keys.clone(), hops).expect("divided trunk");
    assert_eq!(divided.layers(), 1..29);
    let stats = check_exact_through(&keys, Box::new(divided));
    assert!(stats.catch_up_rows_up > 0, "the draws moved K1 across hops");
}

#[test]
fn hops_that_cannot_serve_the_policy_or_leave_a_gap_are_refused() {
    let keys = keys(7, Obfuscation::None);
    let error = keys
        .for_hop(1..3, true, false)
        .expect_err("K1 = 4 is past the hop");
    assert_eq!(
        error.to_string(),
        "the hop running layers 1..3 cannot serve a split point at layer 4 of the policy \
         random K1 {1,2,3,4} K2 {26,27,28,29}"
    );
    let hops = vec![
        hop(&keys, 1..10, true, false),
        hop(&keys, 12..29, false, true),
    ];
    let error = DividedTrunk::new(keys, hops).expect_err("a gap");
    assert_eq!(
        error.to_string(),
        "the trunk's hops must follow each other: layers 1..10 then 12..29"
    );
}

#[test]
fn greedy_generation_matches_the_unsplit_model() {
    let f = fixture();
    let options = GenerateOptions {
        max_tokens: GENERATED,
        ..GenerateOptions::default()
    };
    let mut reference = f.unsplit.unsplit_session().expect("unsplit");
    let expected = reference
        .generate(&f.prompt, &options, &mut |_| {})
        .expect("generate");
    assert_eq!(expected.tokens, f.tokens);
    for obfuscation in [Obfuscation::None, Obfuscation::Permute] {
        let keys = SessionKeys {
            secret: SessionSecret::generate(),
            ..keys(0, obfuscation)
        };
        let mut s = f.keyed.session(local(&keys), &keys).expect("session");
        let got = s
            .generate(&f.prompt, &options, &mut |_| {})
            .expect("generate");
        assert_eq!(got.tokens, expected.tokens, "{obfuscation}");
        assert_eq!(got.text, expected.text, "{obfuscation}");
    }
}

#[test]
fn steps_of_several_tokens_catch_up_too() {
    let f = fixture();
    let keys = keys(5, Obfuscation::Permute);
    let mut s = f.keyed.session(local(&keys), &keys).expect("session");
    let mut whole = f.unsplit.unsplit_session().expect("unsplit");
    let steps: [&[u32]; 5] = [
        &f.prompt[..3],
        &f.prompt[3..],
        &f.tokens[..4],
        &f.tokens[4..5],
        &f.tokens[5..9],
    ];
    for (i, tokens) in steps.iter().enumerate() {
        let expected = whole.forward(tokens).expect("unsplit step");
        let got = s.forward(tokens).expect("keyed step");
        assert_eq!(bits(&got), bits(&expected), "step {i}");
    }
}

/// How a [`Tamper`] changes step `n`'s uplink or downlink (it may call the real trunk again).
type Change = fn(u64, &mut StepRows, &mut StepRows, &mut Box<dyn Trunk>) -> Result<(), TrunkError>;

/// A trunk between device and the real one that can tamper with the conversation.
struct Tamper {
    inner: Box<dyn Trunk>,
    steps: u64,
    change: Change,
}

impl Trunk for Tamper {
    fn layers(&self) -> Range<usize> {
        self.inner.layers()
    }

    fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError> {
        let mut up = message.clone();
        let mut down = self.inner.step(&up)?;
        (self.change)(self.steps, &mut up, &mut down, &mut self.inner)?;
        self.steps += 1;
        Ok(down)
    }
}

/// The error of a keyed session whose trunk is `trunk`, within the first decode steps.
fn desync(trunk: Box<dyn Trunk>, keys: &SessionKeys) -> String {
    let f = fixture();
    let mut s = f.keyed.session(trunk, keys).expect("session");
    let mut result = s.forward(&f.prompt);
    for &token in &f.tokens[..6] {
        if result.is_err() {
            break;
        }
        result = s.forward(&[token]);
    }
    match result {
        Ok(_) => panic!("the desync went unnoticed"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_desync_is_an_error_never_garbage() {
    let ours = keys(6, Obfuscation::None);
    // A trunk holding another secret draws other split points: the first message is refused.
    let theirs = keys(7, Obfuscation::None);
    assert_eq!(
        desync(local(&theirs), &ours),
        "trunk: desync: the uplink message of step 0 does not carry this session's tag: the two \
         ends do not share the session secret, or disagree on the step's split points or rows"
    );
    // A step delivered twice (a replay after a lost answer) is refused by the trunk.
    let replay = Tamper {
        inner: local(&ours),
        steps: 0,
        change: |step, up, _, inner| {
            if step == 2 {
                inner.step(up)?;
            }
            Ok(())
        },
    };
    assert_eq!(
        desync(Box::new(replay), &ours),
        "trunk: desync: the trunk expects step 3 but the message is for step 2"
    );
    // An answer for another step, or moved to other positions, is refused by the device.
    let stale = Tamper {
        inner: local(&ours),
        steps: 0,
        change: |step, _, down, _| {
            if step == 3 {
                down.step = 2;
            }
            Ok(())
        },
    };
    let message = "desync: the downlink message of step 3 does not carry this session's tag: the \
                   two ends do not share the session secret, or disagree on the step's split \
                   points or rows";
    assert_eq!(desync(Box::new(stale), &ours), message);
    let moved = Tamper {
        inner: local(&ours),
        steps: 0,
        change: |step, _, down, _| {
            if step == 3 {
                down.rows.start += 1;
            }
            Ok(())
        },
    };
    assert_eq!(desync(Box::new(moved), &ours), message);
    // A server holds the keys, so it can tag whatever it sends: positions that overflow are
    // refused, not a panic.
    let overflowing = Tamper {
        inner: local(&ours),
        steps: 0,
        change: |step, _, down, _| {
            if step == 3 {
                let mut rows = down.rows.clone();
                rows.start = usize::MAX - 1;
                *down = keys(6, Obfuscation::None).downlink(step, rows);
            }
            Ok(())
        },
    };
    assert_eq!(
        desync(Box::new(overflowing), &ours),
        "desync: the downlink of step 3 holds f32 rows 18446744073709551614..18446744073709551615 \
         but the tail needs f32 rows 0..44"
    );
    // Keys for another policy are refused before any row is computed.
    let f = fixture();
    let other = SessionKeys {
        policy: SplitPolicy::random(&[1, 2], &[26], LAYERS).expect("policy"),
        ..ours.clone()
    };
    match f.keyed.session(local(&ours), &other) {
        Ok(_) => panic!("keys of another policy must be refused"),
        Err(e) => assert_eq!(
            e.to_string(),
            "the session keys' policy is not the one the model was loaded for"
        ),
    }
    let narrow = f
        .source
        .load_part(
            &PartSpec {
                kind: PartKind::Trunk,
                layers: 2..28,
            },
            &Device::Cpu,
        )
        .expect("narrow trunk");
    assert_eq!(
        LocalTrunk::new(Arc::new(narrow), &ours)
            .expect_err("narrow")
            .to_string(),
        "the policy (random K1 {1,2,3,4} K2 {26,27,28,29}) needs trunk layers 1..29 but this \
         trunk holds 2..28"
    );
}

#[test]
fn a_capture_holds_exactly_the_bytes_that_crossed() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = keys(8, Obfuscation::Permute);
    let mut s = f.keyed.session(local(&keys), &keys).expect("session");
    s.capture(CaptureWriter::create(dir.path()).expect("capture"));
    let options = GenerateOptions {
        max_tokens: 12,
        ..GenerateOptions::default()
    };
    let g = s
        .generate(&f.prompt, &options, &mut |_| {})
        .expect("generate");
    let size = |name: &str| std::fs::metadata(dir.path().join(name)).expect(name).len();
    assert_eq!(size("up.bin"), g.stats.bytes_up);
    assert_eq!(size("down.bin"), g.stats.bytes_down);
    let messages = read_capture(dir.path()).expect("read the capture");
    let steps = g.stats.positions() - f.prompt.len() + 1;
    assert_eq!(messages.len(), 2 * steps);
    for (i, m) in messages.iter().enumerate() {
        let way = if i % 2 == 0 { Way::Up } else { Way::Down };
        assert_eq!((m.direction, m.step), (way, (i / 2) as u64));
        assert!(m.tag.is_some());
        assert_eq!(m.rows.width, HIDDEN);
    }
    let total = |way| {
        messages
            .iter()
            .filter(|m| m.direction == way)
            .map(|m| m.rows.bytes.len() as u64)
            .sum::<u64>()
    };
    assert_eq!(total(Way::Up), g.stats.bytes_up);
    assert_eq!(total(Way::Down), g.stats.bytes_down);
}

/// A fixed split and a random split go through the same step path (fixed is the policy with
/// one draw) and both generate the unsplit model's greedy tokens.
#[test]
fn fixed_and_random_splits_take_one_path_to_the_unsplit_tokens() {
    let f = fixture();
    let options = GenerateOptions {
        max_tokens: GENERATED,
        ..GenerateOptions::default()
    };
    let tokenizer = Arc::new(load_tokenizer(&f.source).expect("tokenizer"));
    let plan = lsplit_model::SplitPlan::new(2, 28, LAYERS).expect("plan");
    let fixed = DeviceModel::split(
        &f.source,
        SplitPolicy::fixed(plan),
        tokenizer,
        Codec::F32,
        &Device::Cpu,
    )
    .expect("fixed head and tail");
    let fixed_trunk = Arc::new(
        f.source
            .load_part(&plan.trunk(), &Device::Cpu)
            .expect("fixed trunk"),
    );
    for (model, trunk) in [(&fixed, &fixed_trunk), (&f.keyed, &f.trunk)] {
        let keys = model.new_keys(Obfuscation::None).expect("keys");
        let local = LocalTrunk::new(trunk.clone(), &keys).expect("trunk session");
        let mut s = model.session(Box::new(local), &keys).expect("session");
        let got = s
            .generate(&f.prompt, &options, &mut |_| {})
            .expect("generate");
        assert_eq!(got.tokens, f.tokens, "{}", keys.policy);
    }
}
