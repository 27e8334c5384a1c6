//! Split exactness on the real SmolLM2-135M-Instruct (Q4_1 GGUF, L = 30, hidden 576): with the
//! lossless f32 codec, a split model — head and tail on the device, the trunk behind the
//! `Trunk` trait — computes exactly what the unsplit model computes. Logits are compared bit
//! for bit (`f32::to_bits`) at the prefill and at every decode step, and greedy generation
//! gives the same tokens and text.
//!
//! Also: wire byte counts are exact, lossy codecs run, an over-long prompt and a trunk whose
//! layers differ from the plan are refused with exact messages, and reduced-precision KV caches
//! (f16, q8) keep split and unsplit runs identical while staying close to the f32 cache.

mod common;

use common::{argmax, bits};

use std::ops::ControlFlow;
use std::sync::{Arc, OnceLock};

use candle_core::Device;
use lsplit_model::{KvPrecision, ModelSource, PartKind, PartSpec, SplitPlan};
use lsplit_split::{
    DeviceModel, GenerateOptions, Generation, LocalTrunk, Obfuscation, Session, SessionKeys,
    SplitPolicy, StopReason, Trunk, load_tokenizer,
};
use lsplit_tokenizer::Tokenizer;
use lsplit_wire::Codec;

const LAYERS: usize = 30;
const HIDDEN: usize = 576;
const CONTEXT: usize = 8192;
/// One-token steps after the prefill at which logits are compared.
const DECODE_STEPS: usize = 3;
/// Tokens generated in the greedy text comparisons.
const GENERATED: usize = 24;

struct Fixture {
    source: ModelSource,
    tokenizer: Arc<Tokenizer>,
    unsplit: DeviceModel,
    prompt: Vec<u32>,
    /// The unsplit model's logits at the prefill and after each of its greedy tokens.
    logits: Vec<Vec<f32>>,
    /// The unsplit model's greedy tokens fed back at each decode step.
    tokens: Vec<u32>,
}

/// The model, opened once, and the unsplit reference run.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path = lsplit_fetch::ensure_default_model().expect("fetch the default model");
        let source = ModelSource::open(&path).expect("open the default model");
        assert_eq!(source.config().num_layers, LAYERS);
        assert_eq!(source.config().hidden_size, HIDDEN);
        assert_eq!(source.config().context_length, CONTEXT);
        let tokenizer = Arc::new(load_tokenizer(&source).expect("tokenizer"));
        let unsplit = DeviceModel::unsplit(&source, tokenizer.clone(), &Device::Cpu)
            .expect("load the unsplit model");
        // A short raw prompt: prefill cost grows with its length, and every split runs it.
        let prompt = unsplit
            .prompt_tokens("The three primary colours are", true)
            .expect("prompt");
        assert!(prompt.len() <= 8, "{prompt:?}");
        let mut session = unsplit.unsplit_session().expect("unsplit session");
        let mut logits = vec![session.forward(&prompt).expect("prefill")];
        let mut tokens = Vec::new();
        for _ in 0..DECODE_STEPS {
            let next = argmax(logits.last().expect("logits"));
            tokens.push(next);
            logits.push(session.forward(&[next]).expect("decode step"));
        }
        assert_eq!(
            session.stats().bytes_up,
            0,
            "nothing crosses a wire unsplit"
        );
        Fixture {
            source,
            tokenizer,
            unsplit,
            prompt,
            logits,
            tokens,
        }
    })
}

/// The device side of `plan` with `codec`, and a fresh in-process trunk session for it.
fn split_model(plan: SplitPlan, codec: Codec) -> (DeviceModel, Arc<lsplit_model::ModelPart>) {
    let f = fixture();
    let policy = SplitPolicy::fixed(plan);
    let device = DeviceModel::split(&f.source, policy, f.tokenizer.clone(), codec, &Device::Cpu)
        .expect("load head and tail");
    let trunk = f
        .source
        .load_part(&plan.trunk(), &Device::Cpu)
        .expect("load trunk");
    (device, Arc::new(trunk))
}

fn session<'m>(model: &'m DeviceModel, trunk: &Arc<lsplit_model::ModelPart>) -> Session<'m> {
    let keys = model.new_keys(Obfuscation::None).expect("keys");
    let trunk = LocalTrunk::new(trunk.clone(), &keys).expect("trunk session");
    model
        .session(Box::new(trunk), &keys)
        .expect("split session")
}

/// Runs the prompt and the reference's greedy tokens through split `k1:k2` and compares every
/// step's logits bit for bit; checks the wire byte counts.
fn check_split(k1: usize, k2: usize) {
    let f = fixture();
    let plan = SplitPlan::new(k1, k2, LAYERS).expect("valid split");
    let (model, trunk) = split_model(plan, Codec::F32);
    assert_eq!(model.plan(), Some(plan));
    assert_eq!(model.trunk_layers(), Some(k1..k2));
    let parts = model.parts();
    assert_eq!(parts[0].spec().kind, PartKind::Head);
    assert_eq!(parts[0].spec().layers, 0..k1);
    assert_eq!(parts[1].spec().kind, PartKind::Tail);
    assert_eq!(parts[1].spec().layers, k2..LAYERS);
    assert_eq!(trunk.spec().layers, k1..k2);

    let mut s = session(&model, &trunk);
    let mut logits = s.forward(&f.prompt).expect("prefill");
    for (step, expected) in f.logits.iter().enumerate() {
        assert_eq!(logits.len(), expected.len());
        if bits(&logits) != bits(expected) {
            let diff = logits
                .iter()
                .zip(expected)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            panic!("split {plan}: logits differ from the unsplit model at step {step} ({diff})");
        }
        if let Some(&next) = f.tokens.get(step) {
            assert_eq!(argmax(&logits), next, "split {plan}: step {step}");
            logits = s.forward(&[next]).expect("decode step");
        }
    }
    let positions = (f.prompt.len() + DECODE_STEPS) as u64;
    assert_eq!(s.position(), f.prompt.len() + DECODE_STEPS);
    assert_eq!(s.stats().bytes_up, positions * HIDDEN as u64 * 4, "{plan}");
    assert_eq!(
        s.stats().bytes_down,
        positions * HIDDEN as u64 * 4,
        "{plan}"
    );
}

macro_rules! split_tests {
    ($($name:ident: $k1:expr, $k2:expr;)*) => {$(
        #[test]
        fn $name() {
            check_split($k1, $k2);
        }
    )*};
}

split_tests! {
    split_0_0: 0, 0;
    split_0_30: 0, 30;
    split_30_30: 30, 30;
    split_7_7: 7, 7;
    split_15_15: 15, 15;
    split_1_29: 1, 29;
    split_2_28: 2, 28;
    split_3_27: 3, 27;
    split_5_17: 5, 17;
    split_13_14: 13, 14;
    split_29_30: 29, 30;
    split_0_1: 0, 1;
    split_29_29: 29, 29;
    split_10_25: 10, 25;
}

/// Greedy generation through `session`, collecting the streamed text.
fn generate(session: &mut Session<'_>, prompt: &[u32], max_tokens: usize) -> Generation {
    let mut streamed = String::new();
    let options = GenerateOptions {
        max_tokens,
        ..GenerateOptions::default()
    };
    assert_eq!(options.sampling.temperature, 0.0, "greedy by default");
    let generation = session
        .generate(prompt, &options, &mut |piece| streamed.push_str(piece))
        .expect("generate");
    assert_eq!(
        streamed, generation.text,
        "streamed pieces add up to the text"
    );
    generation
}

/// Wire bytes of a finished split generation: every position crossed up and down once.
fn check_wire_bytes(g: &Generation, prompt: usize, bytes_per_value: u64) {
    let s = &g.stats;
    assert_eq!(s.prompt_tokens, prompt);
    assert_eq!(s.generated_tokens, g.tokens.len());
    if g.stop == StopReason::MaxTokens {
        // The last token is sampled but never sent through the model.
        assert_eq!(s.decode_steps, g.tokens.len() - 1);
    }
    assert_eq!(s.positions(), prompt + s.decode_steps);
    let expected = s.positions() as u64 * HIDDEN as u64 * bytes_per_value;
    assert_eq!(s.bytes_up, expected);
    assert_eq!(s.bytes_down, expected);
}

#[test]
fn greedy_generation_is_identical_across_splits() {
    let f = fixture();
    let mut reference = f.unsplit.unsplit_session().expect("unsplit session");
    let expected = generate(&mut reference, &f.prompt, GENERATED);
    assert_eq!(expected.stop, StopReason::MaxTokens, "{:?}", expected.text);
    assert_eq!(expected.tokens.len(), GENERATED);
    assert_eq!(&expected.tokens[..DECODE_STEPS], &f.tokens[..]);
    assert!(!expected.text.trim().is_empty());
    assert_eq!(expected.stats.bytes_up, 0);

    for (k1, k2) in [(3, 27), (15, 15)] {
        let plan = SplitPlan::new(k1, k2, LAYERS).expect("plan");
        let (model, trunk) = split_model(plan, Codec::F32);
        let mut s = session(&model, &trunk);
        let got = generate(&mut s, &f.prompt, GENERATED);
        assert_eq!(got.tokens, expected.tokens, "split {plan}");
        assert_eq!(got.text, expected.text, "split {plan}");
        assert_eq!(got.stop, expected.stop, "split {plan}");
        check_wire_bytes(&got, f.prompt.len(), 4);
    }
}

/// Tokens of the reduced-precision cache comparisons: long enough for the cache's rounding to
/// build up.
const LONG: usize = 64;

#[test]
fn reduced_precision_kv_caches_keep_split_equal_to_unsplit() {
    let f = fixture();
    let mut reference = f.unsplit.unsplit_session().expect("unsplit session");
    let exact = generate(&mut reference, &f.prompt, LONG);
    let path = lsplit_fetch::ensure_default_model().expect("fetch the default model");
    for precision in [KvPrecision::F16, KvPrecision::Q8] {
        let mut source = ModelSource::open(&path).expect("open the default model");
        source.set_kv_precision(precision);
        let unsplit = DeviceModel::unsplit(&source, f.tokenizer.clone(), &Device::Cpu)
            .expect("load the unsplit model");
        assert_eq!(unsplit.parts()[0].kv_precision(), precision);
        let expected = generate(
            &mut unsplit.unsplit_session().expect("session"),
            &f.prompt,
            LONG,
        );
        let plan = SplitPlan::new(3, 27, LAYERS).expect("plan");
        let policy = SplitPolicy::fixed(plan);
        let model = DeviceModel::split(
            &source,
            policy,
            f.tokenizer.clone(),
            Codec::F32,
            &Device::Cpu,
        )
        .expect("load head and tail");
        let trunk = Arc::new(
            source
                .load_part(&plan.trunk(), &Device::Cpu)
                .expect("trunk"),
        );
        let got = generate(&mut session(&model, &trunk), &f.prompt, LONG);
        assert_eq!(got.tokens, expected.tokens, "{precision}: split 3:27");
        assert_eq!(got.text, expected.text, "{precision}");

        // Against the f32 cache, teacher-forced on its tokens: the same choice at nearly every
        // step, and logits within a bound.
        let mut s = unsplit.unsplit_session().expect("session");
        let mut ours = vec![s.forward(&f.prompt).expect("prefill")];
        let mut theirs = f.unsplit.unsplit_session().expect("session");
        let mut exact_logits = vec![theirs.forward(&f.prompt).expect("prefill")];
        for &token in &exact.tokens[..LONG - 1] {
            ours.push(s.forward(&[token]).expect("step"));
            exact_logits.push(theirs.forward(&[token]).expect("step"));
        }
        let agree = ours
            .iter()
            .zip(&exact.tokens)
            .filter(|(logits, token)| argmax(logits) == **token)
            .count();
        let worst = ours
            .iter()
            .zip(&exact_logits)
            .map(|(a, b)| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())))
            .fold(0f32, f32::max);
        // Measured: f16 64 of 64 and 1.3, q8 63 of 64 and 1.5 (each product re-quantizes its
        // input to 8 bits, which turns small differences into steps of about one logit).
        assert!(agree >= LONG - 3, "{precision}: {agree} of {LONG} agree");
        assert!(worst < 3.0, "{precision}: logits differ by up to {worst}");
        assert!(
            ours.iter()
                .zip(&exact_logits)
                .any(|(a, b)| bits(a) != bits(b)),
            "{precision}: the cache's precision was not applied"
        );
    }
}

#[test]
fn steps_report_each_token_and_a_break_stops_the_generation() {
    let f = fixture();
    let plan = SplitPlan::new(3, 27, LAYERS).expect("plan");
    let (model, trunk) = split_model(plan, Codec::F32);
    let full = generate(&mut session(&model, &trunk), &f.prompt, GENERATED);

    let options = GenerateOptions {
        max_tokens: GENERATED,
        ..GenerateOptions::default()
    };
    let row = HIDDEN as u64 * 4;
    let mut steps = Vec::new();
    let mut s = session(&model, &trunk);
    let stopped = s
        .generate_steps(&f.prompt, &options, &mut |step| {
            steps.push((step.token, step.text.to_string(), step.stats.bytes_up));
            if steps.len() == 5 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .expect("generate");
    assert_eq!(stopped.stop, StopReason::Stopped);
    assert_eq!(stopped.tokens, full.tokens[..5]);
    let tokens: Vec<u32> = steps.iter().map(|(t, _, _)| *t).collect();
    assert_eq!(tokens, full.tokens[..5]);
    let text: String = steps.iter().map(|(_, t, _)| t.as_str()).collect();
    assert!(full.text.starts_with(&text), "{text:?} / {:?}", full.text);
    // Step i comes after the prompt pass and i one-token steps.
    let bytes: Vec<u64> = steps.iter().map(|(_, _, b)| *b).collect();
    let expected: Vec<u64> = (0..5).map(|i| (f.prompt.len() as u64 + i) * row).collect();
    assert_eq!(bytes, expected);
}

#[test]
fn lossy_codecs_run_and_count_two_bytes_per_value() {
    let f = fixture();
    let plan = SplitPlan::new(3, 27, LAYERS).expect("plan");
    for codec in [Codec::F16, Codec::Bf16] {
        let (model, trunk) = split_model(plan, codec);
        assert_eq!(model.codec(), codec);
        let mut s = session(&model, &trunk);
        let g = generate(&mut s, &f.prompt, 6);
        assert!(!g.tokens.is_empty(), "{codec}");
        assert!(!g.text.trim().is_empty(), "{codec}: no text");
        check_wire_bytes(&g, f.prompt.len(), 2);
    }
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let f = fixture();
    let too_long = vec![f.prompt[0]; CONTEXT + 1];
    let message = "the prompt is 8193 tokens long but the model's context length is 8192";

    let mut unsplit = f.unsplit.unsplit_session().expect("unsplit session");
    let options = GenerateOptions::default();
    assert_eq!(
        unsplit
            .generate(&too_long, &options, &mut |_| {})
            .expect_err("too long")
            .to_string(),
        message
    );
    assert_eq!(
        unsplit
            .forward(&too_long)
            .expect_err("too long")
            .to_string(),
        message
    );
    assert_eq!(unsplit.position(), 0);

    let plan = SplitPlan::new(3, 27, LAYERS).expect("plan");
    let (model, trunk) = split_model(plan, Codec::F32);
    assert_eq!(model.context_length(), CONTEXT);
    let mut s = session(&model, &trunk);
    assert_eq!(
        s.generate(&too_long, &options, &mut |_| {})
            .expect_err("too long")
            .to_string(),
        message
    );
    assert_eq!(
        s.forward(&too_long).expect_err("too long").to_string(),
        message
    );
    assert_eq!(s.position(), 0);
    assert_eq!(s.stats().bytes_up, 0, "nothing was sent");
    assert_eq!(
        s.forward(&[]).expect_err("empty").to_string(),
        "the prompt is empty"
    );
    // The refused session is still usable, and still exact.
    let logits = s.forward(&f.prompt).expect("prefill after refusals");
    assert_eq!(bits(&logits), bits(&f.logits[0]));
}

fn session_err(model: &DeviceModel, trunk: Option<Box<dyn Trunk>>, keys: &SessionKeys) -> String {
    let result = match trunk {
        Some(trunk) => model.session(trunk, keys),
        None => model.unsplit_session(),
    };
    match result {
        Ok(_) => panic!("the session must be refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn trunk_layers_must_match_the_plan() {
    let f = fixture();
    let plan = SplitPlan::new(3, 27, LAYERS).expect("plan");
    let (model, trunk) = split_model(plan, Codec::F32);
    let keys = model.new_keys(Obfuscation::None).expect("keys");
    let message = "the trunk's layers do not match the device's split points";
    for layers in [3..26, 2..27, 4..28, 0..30] {
        let wrong: Box<dyn Trunk> = Box::new(Holding(layers.clone()));
        assert_eq!(
            session_err(&model, Some(wrong), &keys),
            message,
            "{layers:?}"
        );
    }
    // An in-process trunk session refuses keys whose draws need layers it does not hold.
    let narrow = f
        .source
        .load_part(
            &PartSpec {
                kind: PartKind::Trunk,
                layers: 4..27,
            },
            &Device::Cpu,
        )
        .expect("load trunk");
    assert_eq!(
        LocalTrunk::new(Arc::new(narrow), &keys)
            .expect_err("narrow")
            .to_string(),
        "the policy (fixed 3:27) needs trunk layers 3..27 but this trunk holds 4..27"
    );
    assert_eq!(
        session_err(&model, None, &keys),
        "a split model needs a trunk session"
    );
    let right: Box<dyn Trunk> = Box::new(LocalTrunk::new(trunk.clone(), &keys).expect("trunk"));
    assert_eq!(
        session_err(&f.unsplit, Some(right), &keys),
        "an unsplit model takes no trunk"
    );

    // A trunk session refuses rows that skip positions.
    let mut local = LocalTrunk::new(trunk, &keys).expect("trunk");
    let rows = Codec::F32
        .encode(
            &candle_core::Tensor::zeros((2, HIDDEN), candle_core::DType::F32, &Device::Cpu)
                .expect("zeros"),
            5,
        )
        .expect("encode");
    assert_eq!(
        local
            .step(&keys.uplink(0, rows))
            .expect_err("wrong start")
            .to_string(),
        "desync: step 0 sends rows 5..7 but the trunk needs rows from 0 past 0"
    );
    assert_eq!(local.cache_bytes(), 0);
}

/// A trunk that holds `layers` and answers no step: what the device checks before a session.
struct Holding(std::ops::Range<usize>);

impl Trunk for Holding {
    fn layers(&self) -> std::ops::Range<usize> {
        self.0.clone()
    }

    fn step(
        &mut self,
        _: &lsplit_split::StepRows,
    ) -> Result<lsplit_split::StepRows, lsplit_split::TrunkError> {
        Err(lsplit_split::TrunkError::Transport("never reached".into()))
    }
}

/// A trunk that records whether each of its steps ran on a thread of the compute pool.
struct PoolProbe {
    inner: LocalTrunk,
    in_process: bool,
    on_pool: Arc<std::sync::Mutex<Vec<bool>>>,
}

impl Trunk for PoolProbe {
    fn layers(&self) -> std::ops::Range<usize> {
        self.inner.layers()
    }

    fn step(
        &mut self,
        message: &lsplit_split::StepRows,
    ) -> Result<lsplit_split::StepRows, lsplit_split::TrunkError> {
        self.on_pool
            .lock()
            .expect("probe")
            .push(rayon::current_thread_index().is_some());
        self.inner.step(message)
    }

    fn in_process(&self) -> bool {
        self.in_process
    }
}

/// An in-process trunk's steps run inside the device step's pool task; a trunk that may wait
/// on a network is called from the caller's own thread, so its wait never holds a pool thread.
/// Either way the logits are the unsplit model's.
#[test]
fn only_an_in_process_trunk_runs_on_the_compute_pool() {
    let f = fixture();
    let (model, trunk) = split_model(SplitPlan::new(2, 28, LAYERS).expect("plan"), Codec::F32);
    for in_process in [true, false] {
        let on_pool = Arc::new(std::sync::Mutex::new(Vec::new()));
        let keys = model.new_keys(Obfuscation::None).expect("keys");
        let probe = PoolProbe {
            inner: LocalTrunk::new(trunk.clone(), &keys).expect("trunk"),
            in_process,
            on_pool: on_pool.clone(),
        };
        let mut session = model.session(Box::new(probe), &keys).expect("session");
        let logits = session.forward(&f.prompt).expect("prefill");
        assert_eq!(
            bits(&logits),
            bits(&f.logits[0]),
            "in process: {in_process}"
        );
        session.forward(&f.tokens[..1]).expect("decode");
        assert_eq!(*on_pool.lock().expect("probe"), vec![in_process; 2]);
    }
}
