//! The default model (SmolLM2) split on a real trunk server, and the in-process reference that a
//! remote generation must equal token for token.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};

use candle_core::Device;
use lsplit_model::{KvPrecision, ModelPart, ModelSource, SplitPlan, TrunkFingerprint};
use lsplit_remote::{RemoteError, RemoteOptions, RemoteTrunk};
use lsplit_server::{DevCertificates, Limits, ServerOptions, TrunkServer};
use lsplit_split::{
    DeviceModel, GenerateOptions, LocalTrunk, Obfuscation, SessionKeys, SplitPolicy, StepRows,
    Trunk, TrunkError, load_tokenizer,
};
use lsplit_wire::{Codec, HiddenRows};

use crate::RunningServer;

/// The prompt most tests generate from.
pub const PROMPT: &str = "The three primary colors are";
/// How many tokens those tests generate.
pub const MAX_TOKENS: usize = 12;

/// The default model's file, fetched and verified on first use.
pub fn model_path() -> PathBuf {
    lsplit_fetch::ensure_default_model().expect("the default model (run `lsplit fetch`)")
}

/// The model file at `path`, opened.
pub fn source(path: &Path) -> ModelSource {
    ModelSource::open(path).expect("open the model")
}

/// Server options with TLS from `certs`, every codec and default limits.
pub fn tls_options(certs: &DevCertificates) -> ServerOptions {
    ServerOptions {
        limits: Limits::default(),
        codecs: Codec::ALL.to_vec(),
        access: crate::tls_access(certs),
        batch_wait: lsplit_server::DEFAULT_BATCH_WAIT,
    }
}

/// Device options for `server` trusting `certs`' CA.
pub fn client_options(
    server: &RunningServer,
    certs: &DevCertificates,
    codec: Codec,
) -> RemoteOptions {
    crate::client_options(&server.url, certs, codec)
}

/// Serves layers `k1..k2` of the model at `path` on 127.0.0.1, on a free port.
pub fn serve(path: &Path, k1: usize, k2: usize, options: ServerOptions) -> RunningServer {
    serve_source(source(path), k1, k2, options, 0)
}

/// Serves layers `k1..k2` on `port`, as a restarted server comes back where it was.
pub fn serve_on(
    path: &Path,
    k1: usize,
    k2: usize,
    options: ServerOptions,
    port: u16,
) -> RunningServer {
    serve_source(source(path), k1, k2, options, port)
}

/// Serves layers `k1..k2` with the trunk's KV caches kept at `precision`.
pub fn serve_with_kv(
    path: &Path,
    k1: usize,
    k2: usize,
    options: ServerOptions,
    precision: KvPrecision,
) -> RunningServer {
    serve_with_kv_on(path, k1, k2, options, precision, 0)
}

/// [`serve_with_kv`] on `port`, as a server restarted with another precision comes back.
pub fn serve_with_kv_on(
    path: &Path,
    k1: usize,
    k2: usize,
    options: ServerOptions,
    precision: KvPrecision,
    port: u16,
) -> RunningServer {
    let mut source = source(path);
    source.set_kv_precision(precision);
    serve_source(source, k1, k2, options, port)
}

fn serve_source(
    source: ModelSource,
    k1: usize,
    k2: usize,
    options: ServerOptions,
    port: u16,
) -> RunningServer {
    let plan = SplitPlan::new(k1, k2, source.config().num_layers).expect("split");
    let part = source
        .load_part(&plan.trunk(), &Device::Cpu)
        .expect("trunk part");
    let fingerprint = TrunkFingerprint::compute(&source, k1..k2).expect("fingerprint");
    let tls = options.access.tls.is_some();
    let server = TrunkServer::new(part, fingerprint, options).expect("server");
    RunningServer::start(server, port, "127.0.0.1", tls)
}

/// The device's model for split `k1:k2`.
pub fn device_model(path: &Path, k1: usize, k2: usize, codec: Codec) -> DeviceModel {
    let source = source(path);
    let plan = SplitPlan::new(k1, k2, source.config().num_layers).expect("split");
    policy_model(&source, SplitPolicy::fixed(plan), codec)
}

/// The device's model for `policy`.
pub fn policy_model(source: &ModelSource, policy: SplitPolicy, codec: Codec) -> DeviceModel {
    let tokenizer = Arc::new(load_tokenizer(source).expect("tokenizer"));
    DeviceModel::split(source, policy, tokenizer, codec, &Device::Cpu).expect("device model")
}

/// A trunk that opens its session with the keys a generation gives it.
pub trait Unkeyed {
    /// The trunk's session under `keys`.
    fn keyed(self: Box<Self>, keys: &SessionKeys) -> Box<dyn Trunk>;
}

impl Unkeyed for RemoteTrunk {
    fn keyed(self: Box<Self>, keys: &SessionKeys) -> Box<dyn Trunk> {
        Box::new(self.with_keys(keys.clone()))
    }
}

impl Unkeyed for Arc<ModelPart> {
    fn keyed(self: Box<Self>, keys: &SessionKeys) -> Box<dyn Trunk> {
        Box::new(LocalTrunk::new(*self, keys).expect("trunk session"))
    }
}

/// Generates greedily from [`PROMPT`] with `trunk`.
pub fn generate(model: &DeviceModel, trunk: Box<dyn Unkeyed>) -> Vec<u32> {
    generate_from(model, trunk, PROMPT)
}

/// Generates greedily from `prompt` (raw, no chat template) with `trunk`, in a session with
/// fresh keys.
pub fn generate_from(model: &DeviceModel, trunk: Box<dyn Unkeyed>, prompt: &str) -> Vec<u32> {
    let keys = model.new_keys(Obfuscation::None).expect("keys");
    generate_keyed(model, trunk.keyed(&keys), &keys, prompt)
}

/// Generates greedily from `prompt` (raw, no chat template) with `trunk`, under `keys`.
pub fn generate_keyed(
    model: &DeviceModel,
    trunk: Box<dyn Trunk>,
    keys: &SessionKeys,
    prompt: &str,
) -> Vec<u32> {
    let prompt = model.prompt_tokens(prompt, true).expect("prompt");
    let options = GenerateOptions {
        max_tokens: MAX_TOKENS,
        ..GenerateOptions::default()
    };
    let mut session = model.session(trunk, keys).expect("session");
    session
        .generate(&prompt, &options, &mut |_| {})
        .expect("generate")
        .tokens
}

/// The trunk part that `model`'s sessions need, loaded in this process.
pub fn local_trunk(path: &Path, model: &DeviceModel) -> Arc<ModelPart> {
    let spec = lsplit_model::PartSpec {
        kind: lsplit_model::PartKind::Trunk,
        layers: model.trunk_layers().expect("a split model"),
    };
    Arc::new(source(path).load_part(&spec, &Device::Cpu).expect("trunk"))
}

/// The in-process reference output for split `k1:k2`.
pub fn in_process(path: &Path, k1: usize, k2: usize, codec: Codec) -> Vec<u32> {
    let model = device_model(path, k1, k2, codec);
    generate(&model, Box::new(local_trunk(path, &model)))
}

/// Connects to a server and checks its fingerprint against the device's own model.
pub fn remote(path: &Path, options: RemoteOptions) -> Result<RemoteTrunk, RemoteError> {
    let trunk = RemoteTrunk::connect(options)?;
    let layers = trunk.info().fingerprint.layers.clone();
    trunk.verify(&TrunkFingerprint::compute(&source(path), layers).expect("fingerprint"))?;
    Ok(trunk)
}

/// One device per prompt, all connected before any starts, generating at once through the
/// server `options` names; their outputs in the prompts' order.
pub fn concurrent_devices(
    path: &Path,
    model: &DeviceModel,
    prompts: &[&str],
    options: &RemoteOptions,
) -> Vec<Vec<u32>> {
    let barrier = Barrier::new(prompts.len());
    std::thread::scope(|scope| {
        let devices: Vec<_> = prompts
            .iter()
            .map(|prompt| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let trunk = remote(path, options.clone()).expect("connect");
                    barrier.wait();
                    generate_from(model, Box::new(trunk), prompt)
                })
            })
            .collect();
        devices
            .into_iter()
            .map(|device| device.join().expect("device"))
            .collect()
    })
}

/// Hidden rows of the model's width with finite, made-up values.
pub fn hidden_rows(codec: Codec, start: usize, rows: usize) -> HiddenRows {
    let values: Vec<f32> = (0..rows * 576)
        .map(|i| ((i % 97) as f32 - 48.0) * 0.01)
        .collect();
    let tensor = candle_core::Tensor::from_vec(values, (rows, 576), &Device::Cpu).expect("tensor");
    codec.encode(&tensor, start).expect("encode")
}

/// A remote trunk whose server is killed just before the trunk's `kill_at`-th step and started
/// again on the same port, empty: the device must rebuild its session by replaying.
pub struct RestartedMidway {
    inner: Box<dyn Trunk>,
    server: Option<RunningServer>,
    steps: usize,
    kill_at: usize,
    path: PathBuf,
    options: ServerOptions,
    precision: KvPrecision,
}

impl RestartedMidway {
    /// Wraps `inner`, a trunk of `server` (which serves the model at `path` with `options`).
    pub fn new(
        inner: Box<dyn Trunk>,
        server: RunningServer,
        kill_at: usize,
        path: &Path,
        options: ServerOptions,
    ) -> Self {
        Self {
            inner,
            server: Some(server),
            steps: 0,
            kill_at,
            path: path.to_owned(),
            options,
            precision: KvPrecision::F32,
        }
    }

    /// The server comes back keeping its KV caches at `precision`.
    pub fn with_kv_precision(mut self, precision: KvPrecision) -> Self {
        self.precision = precision;
        self
    }
}

impl Trunk for RestartedMidway {
    fn layers(&self) -> Range<usize> {
        self.inner.layers()
    }

    fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError> {
        if self.steps == self.kill_at {
            let server = self.server.take().expect("the server runs");
            let port = server.addr.port();
            server.kill();
            let layers = self.inner.layers();
            self.server = Some(serve_with_kv_on(
                &self.path,
                layers.start,
                layers.end,
                self.options.clone(),
                self.precision,
                port,
            ));
        }
        self.steps += 1;
        self.inner.step(message)
    }
}
