//! Keyed sessions over a real trunk server on loopback TLS: random split points and the
//! permutation, their secret sent in the session's `Open` inside TLS, the server holding the
//! union of the layers any draw may need. Remote output equals in-process output; a server
//! that loses the session mid-generation is rebuilt by replaying the tagged steps; a device
//! and a server holding different secrets stop at the first step with a desync error.

mod common;

use std::ops::Range;
use std::sync::Arc;

use candle_core::Device;
use common::*;
use lsplit_model::{KvPrecision, PartKind, PartSpec};
use lsplit_server::DevCertificates;
use lsplit_split::{
    DeviceModel, GenerateOptions, LocalTrunk, Obfuscation, SessionKeys, SessionSecret, SplitPolicy,
    StepRows, Trunk, TrunkError, load_tokenizer,
};
use lsplit_wire::Codec;

fn policy() -> SplitPolicy {
    SplitPolicy::parse("1,2,3,4", "26,27,28,29", 30).expect("policy")
}

fn keys(seed: u8) -> SessionKeys {
    SessionKeys {
        policy: policy(),
        obfuscation: Obfuscation::Permute,
        secret: SessionSecret::from_bytes([seed; 32]),
    }
}

fn keyed_model(codec: Codec) -> DeviceModel {
    let source = source(&model_path());
    let tokenizer = Arc::new(load_tokenizer(&source).expect("tokenizer"));
    DeviceModel::split(&source, policy(), tokenizer, codec, &Device::Cpu).expect("keyed model")
}

fn keyed_generate(model: &DeviceModel, trunk: Box<dyn Trunk>, keys: &SessionKeys) -> Vec<u32> {
    let prompt = model.prompt_tokens(PROMPT, true).expect("prompt");
    let options = GenerateOptions {
        max_tokens: MAX_TOKENS,
        ..GenerateOptions::default()
    };
    let mut session = model.session(trunk, keys).expect("keyed session");
    session
        .generate(&prompt, &options, &mut |_| {})
        .expect("generate")
        .tokens
}

#[test]
fn remote_keyed_output_equals_in_process_output() {
    let path = model_path();
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let union = policy().trunk_layers();
    let server = TestServer::start(&path, union.start, union.end, tls_options(&certs));
    let model = keyed_model(Codec::F32);
    let keys = keys(1);

    let part = source(&path)
        .load_part(
            &PartSpec {
                kind: PartKind::Trunk,
                layers: union.clone(),
            },
            &Device::Cpu,
        )
        .expect("trunk");
    let local = LocalTrunk::new(Arc::new(part), &keys).expect("local keyed trunk");
    let expected = keyed_generate(&model, Box::new(local), &keys);
    assert_eq!(
        expected,
        in_process(&path, 2, 28, Codec::F32),
        "keyed equals plain"
    );

    let remote = remote(&path, client_options(&server, &certs, Codec::F32))
        .expect("connect")
        .with_keys(keys.clone());
    assert_eq!(remote.layers(), union);
    assert_eq!(keyed_generate(&model, Box::new(remote), &keys), expected);
}

/// The real remote trunk, whose server is killed before step `kill_at` and started again on
/// the same port, its KV caches at `precision`.
struct KilledMidway {
    inner: Box<dyn Trunk>,
    server: Option<TestServer>,
    steps: usize,
    kill_at: usize,
    union: Range<usize>,
    precision: KvPrecision,
}

impl KilledMidway {
    /// A session with `keys` on `server`, connected with `options`, whose server is killed
    /// before step `kill_at` and comes back with its KV caches at `precision`.
    fn new(
        server: TestServer,
        options: lsplit_remote::RemoteOptions,
        keys: &SessionKeys,
        kill_at: usize,
        precision: KvPrecision,
    ) -> Self {
        let inner = remote(&model_path(), options)
            .expect("connect")
            .with_keys(keys.clone());
        Self {
            inner: Box::new(inner),
            server: Some(server),
            steps: 0,
            kill_at,
            union: policy().trunk_layers(),
            precision,
        }
    }
}

impl Trunk for KilledMidway {
    fn layers(&self) -> Range<usize> {
        self.inner.layers()
    }

    fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError> {
        if self.steps == self.kill_at {
            let server = self.server.take().expect("the server runs");
            let addr = server.addr;
            server.kill();
            let certs = CERTS.get().expect("certificates");
            self.server = Some(TestServer::start_with_kv_on(
                &model_path(),
                self.union.start,
                self.union.end,
                tls_options(certs),
                self.precision,
                addr.port(),
            ));
        }
        self.steps += 1;
        self.inner.step(message)
    }
}

static CERTS: std::sync::OnceLock<DevCertificates> = std::sync::OnceLock::new();

#[test]
fn a_keyed_session_is_replayed_onto_a_restarted_server() {
    let path = model_path();
    let certs = CERTS.get_or_init(|| DevCertificates::generate(&[]).expect("certificates"));
    let union = policy().trunk_layers();
    let server = TestServer::start(&path, union.start, union.end, tls_options(certs));
    let model = keyed_model(Codec::F16);
    let keys = keys(2);
    let mut options = client_options(&server, certs, Codec::F16);
    options.retry_for = std::time::Duration::from_secs(30);

    let steady = remote(&path, options.clone())
        .expect("connect")
        .with_keys(keys.clone());
    let expected = keyed_generate(&model, Box::new(steady), &keys);

    let killed = KilledMidway::new(server, options, &keys, 4, KvPrecision::F32);
    assert_eq!(keyed_generate(&model, Box::new(killed), &keys), expected);
}

#[test]
fn a_server_restarted_with_another_kv_precision_is_refused() {
    let path = model_path();
    let certs = CERTS.get_or_init(|| DevCertificates::generate(&[]).expect("certificates"));
    let union = policy().trunk_layers();
    let server = TestServer::start(&path, union.start, union.end, tls_options(certs));
    let model = keyed_model(Codec::F32);
    let keys = keys(6);
    let mut options = client_options(&server, certs, Codec::F32);
    options.retry_for = std::time::Duration::from_secs(30);
    let killed = KilledMidway::new(server, options, &keys, 3, KvPrecision::F16);
    let prompt = model.prompt_tokens(PROMPT, true).expect("prompt");
    let options = GenerateOptions {
        max_tokens: MAX_TOKENS,
        ..GenerateOptions::default()
    };
    let mut session = model.session(Box::new(killed), &keys).expect("session");
    let error = session
        .generate(&prompt, &options, &mut |_| {})
        .expect_err("a replay onto other KV precision");
    assert_eq!(
        error.to_string(),
        "trunk: protocol error: the server came back with KV cache precision f16, not KV cache \
         precision f32: the session's replay would compute other text"
    );
}

#[test]
fn different_secrets_stop_at_the_first_step() {
    let path = model_path();
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let union = policy().trunk_layers();
    let server = TestServer::start(&path, union.start, union.end, tls_options(&certs));
    let model = keyed_model(Codec::F32);
    let theirs = remote(&path, client_options(&server, &certs, Codec::F32))
        .expect("connect")
        .with_keys(keys(3));
    let mut session = model.session(Box::new(theirs), &keys(4)).expect("session");
    let prompt = model.prompt_tokens(PROMPT, true).expect("prompt");
    let err = session.forward(&prompt).expect_err("desync");
    assert_eq!(
        err.to_string(),
        "trunk: the trunk server refused: desync: the uplink message of step 0 does not carry \
         this session's tag: the two ends do not share the session secret, or disagree on the \
         step's split points or rows (FailedPrecondition)"
    );

    // A server that does not hold every layer the policy may draw refuses the session.
    let narrow = TestServer::start(&path, 2, 28, tls_options(&certs));
    let narrow = remote(&path, client_options(&narrow, &certs, Codec::F32))
        .expect("connect")
        .with_keys(keys(5));
    match model.session(Box::new(narrow), &keys(5)) {
        Ok(_) => panic!("a trunk without the union of layers must be refused"),
        Err(e) => assert_eq!(
            e.to_string(),
            "the trunk does not hold every layer the policy may draw"
        ),
    }
}

/// Random sessions whose draws give the trunk its whole part (here K1 = 1 of {1, 2}, K2 = 28)
/// run those steps in the server's batches with other sessions' steps, and each still gets
/// exactly its solo output.
#[test]
fn random_sessions_join_the_batches_when_their_draw_allows() {
    const PROMPTS: [&str; 6] = [
        "The three primary colors are",
        "Once upon a time",
        "The capital of France is",
        "Water boils at",
        "My favourite animal is",
        "1, 2, 3, 4,",
    ];
    let path = model_path();
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let source = source(&path);
    let policy = SplitPolicy::parse("1,2", "28", 30).expect("policy");
    let tokenizer = Arc::new(load_tokenizer(&source).expect("tokenizer"));
    let model = Arc::new(
        DeviceModel::split(&source, policy.clone(), tokenizer, Codec::F32, &Device::Cpu)
            .expect("model"),
    );
    let part = Arc::new(
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
    let solo: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| generate_from(&model, Box::new(part.clone()), p))
        .collect();

    let server = TestServer::start(&path, 1, 28, tls_options(&certs));
    let barrier = Arc::new(std::sync::Barrier::new(PROMPTS.len()));
    let devices: Vec<_> = PROMPTS
        .iter()
        .map(|prompt| {
            let (model, barrier, path) = (model.clone(), barrier.clone(), path.clone());
            let options = client_options(&server, &certs, Codec::F32);
            std::thread::spawn(move || {
                let trunk = remote(&path, options).expect("connect");
                barrier.wait();
                generate_from(&model, Box::new(trunk), prompt)
            })
        })
        .collect();
    for ((device, expected), prompt) in devices.into_iter().zip(&solo).zip(PROMPTS) {
        assert_eq!(&device.join().expect("device"), expected, "{prompt}");
    }
    assert!(
        server.stats.batched_steps() > 0,
        "no two random sessions' steps ever shared a batch"
    );
}
