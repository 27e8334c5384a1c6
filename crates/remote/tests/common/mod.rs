//! A real trunk server on loopback, real TLS, and the in-process reference to compare against.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use lsplit_model::{KvPrecision, ModelPart, ModelSource, SplitPlan, TrunkFingerprint};
use lsplit_remote::{RemoteOptions, RemoteTrunk};
use lsplit_server::{DevCertificates, Limits, ServerOptions, TlsFiles, TrunkServer};
use lsplit_split::{
    DeviceModel, GenerateOptions, LocalTrunk, Obfuscation, SessionKeys, SplitPolicy, Trunk,
    load_tokenizer,
};
use lsplit_testkit::RunningServer;
use lsplit_wire::Codec;

pub const PROMPT: &str = "The three primary colors are";
pub const MAX_TOKENS: usize = 12;

pub fn model_path() -> PathBuf {
    lsplit_fetch::ensure_default_model().expect("the default model (run `lsplit fetch`)")
}

pub fn source(path: &Path) -> ModelSource {
    ModelSource::open(path).expect("open the model")
}

/// Server options with TLS from `certs` and default limits.
pub fn tls_options(certs: &DevCertificates) -> ServerOptions {
    ServerOptions {
        limits: Limits::default(),
        codecs: Codec::ALL.to_vec(),
        token: None,
        tls: Some(TlsFiles {
            cert_pem: certs.server_pem.clone().into_bytes(),
            key_pem: certs.server_key.clone().into_bytes(),
            client_ca_pem: None,
        }),
        batch_wait: lsplit_server::DEFAULT_BATCH_WAIT,
        transport: lsplit_server::TransportLimits::default(),
    }
}

/// Client options trusting `certs`' CA.
pub fn client_options(server: &TestServer, certs: &DevCertificates, codec: Codec) -> RemoteOptions {
    let mut options = RemoteOptions::new(server.url.clone(), codec);
    options.ca_pem = Some(certs.ca_pem.clone().into_bytes());
    options.connect_timeout = Duration::from_secs(5);
    options.step_timeout = Duration::from_secs(60);
    options.retry_for = Duration::from_secs(3);
    options
}

/// A trunk server running on its own runtime; dropping it kills it abruptly, like a crash.
pub struct TestServer(RunningServer);

impl std::ops::Deref for TestServer {
    type Target = RunningServer;

    fn deref(&self) -> &RunningServer {
        &self.0
    }
}

impl TestServer {
    /// Serves layers `k1..k2` of the model at `path` on 127.0.0.1 (port 0 unless `port`).
    pub fn start(path: &Path, k1: usize, k2: usize, options: ServerOptions) -> Self {
        Self::start_on(path, k1, k2, options, 0)
    }

    pub fn start_on(path: &Path, k1: usize, k2: usize, options: ServerOptions, port: u16) -> Self {
        Self::launch(source(path), k1, k2, options, port)
    }

    /// A server whose trunk keeps its KV caches at `precision`.
    pub fn start_with_kv(
        path: &Path,
        k1: usize,
        k2: usize,
        options: ServerOptions,
        precision: KvPrecision,
    ) -> Self {
        Self::start_with_kv_on(path, k1, k2, options, precision, 0)
    }

    /// A server whose trunk keeps its KV caches at `precision`, on `port`.
    pub fn start_with_kv_on(
        path: &Path,
        k1: usize,
        k2: usize,
        options: ServerOptions,
        precision: KvPrecision,
        port: u16,
    ) -> Self {
        let mut source = source(path);
        source.set_kv_precision(precision);
        Self::launch(source, k1, k2, options, port)
    }

    fn launch(
        source: ModelSource,
        k1: usize,
        k2: usize,
        options: ServerOptions,
        port: u16,
    ) -> Self {
        let plan = SplitPlan::new(k1, k2, source.config().num_layers).expect("split");
        let part = source
            .load_part(&plan.trunk(), &Device::Cpu)
            .expect("trunk part");
        let fingerprint = TrunkFingerprint::compute(&source, k1..k2).expect("fingerprint");
        let tls = options.tls.is_some();
        let server = TrunkServer::new(part, fingerprint, options).expect("server");
        Self(RunningServer::start(server, port, "127.0.0.1", tls))
    }

    /// Kills the server: every connection drops, every session's KV cache is lost.
    pub fn kill(self) {
        self.0.kill();
    }
}

/// The device's model for split `k1:k2`.
pub fn device_model(path: &Path, k1: usize, k2: usize, codec: Codec) -> DeviceModel {
    let source = source(path);
    let tokenizer = Arc::new(load_tokenizer(&source).expect("tokenizer"));
    let plan = SplitPlan::new(k1, k2, source.config().num_layers).expect("split");
    DeviceModel::split(
        &source,
        SplitPolicy::fixed(plan),
        tokenizer,
        codec,
        &Device::Cpu,
    )
    .expect("device model")
}

/// A trunk that opens its session with the keys a generation gives it.
pub trait Unkeyed {
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
    let prompt = model.prompt_tokens(prompt, true).expect("prompt");
    let options = GenerateOptions {
        max_tokens: MAX_TOKENS,
        ..GenerateOptions::default()
    };
    let keys = model.new_keys(Obfuscation::None).expect("keys");
    let mut session = model.session(trunk.keyed(&keys), &keys).expect("session");
    session
        .generate(&prompt, &options, &mut |_| {})
        .expect("generate")
        .tokens
}

/// The in-process reference output for split `k1:k2`.
pub fn in_process(path: &Path, k1: usize, k2: usize, codec: Codec) -> Vec<u32> {
    let source = source(path);
    let model = device_model(path, k1, k2, codec);
    let plan = model.plan().expect("split");
    let part = Arc::new(
        source
            .load_part(&plan.trunk(), &Device::Cpu)
            .expect("trunk"),
    );
    generate(&model, Box::new(part))
}

/// Connects to `server` and checks its fingerprint against the device's own model.
pub fn remote(
    path: &Path,
    options: RemoteOptions,
) -> Result<RemoteTrunk, lsplit_remote::RemoteError> {
    let trunk = RemoteTrunk::connect(options)?;
    let layers = trunk.info().fingerprint.layers.clone();
    trunk.verify(&TrunkFingerprint::compute(&source(path), layers).expect("fingerprint"))?;
    Ok(trunk)
}

/// A raw protocol client over TLS, for sending what a well-behaved device never would.
pub async fn raw_client(
    server: &TestServer,
    certs: &DevCertificates,
) -> lsplit_proto::pb::trunk_client::TrunkClient<tonic::transport::Channel> {
    lsplit_proto::pb::trunk_client::TrunkClient::new(raw_channel(server, certs).await)
}

/// A TLS channel to `server`, trusting `certs`' CA.
pub async fn raw_channel(
    server: &TestServer,
    certs: &DevCertificates,
) -> tonic::transport::Channel {
    lsplit_testkit::tls_channel(&server.url, &certs.ca_pem, None)
        .await
        .expect("connect")
}

/// Hidden rows of the model's width with finite, made-up values.
pub fn hidden_rows(codec: Codec, start: usize, rows: usize) -> lsplit_wire::HiddenRows {
    let values: Vec<f32> = (0..rows * 576)
        .map(|i| ((i % 97) as f32 - 48.0) * 0.01)
        .collect();
    let tensor = candle_core::Tensor::from_vec(values, (rows, 576), &Device::Cpu).expect("tensor");
    codec.encode(&tensor, start).expect("encode")
}
