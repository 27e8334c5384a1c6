//! What the limits and load tests share beyond `lsplit-testkit`: the default model's trunk
//! served over TLS with a token, raw protocol clients carrying it, and the device that
//! generates through it.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use lsplit_model::{SplitPlan, TrunkFingerprint};
use lsplit_proto::pb::session_reply::Kind as ReplyKind;
use lsplit_proto::pb::session_request::Kind as RequestKind;
use lsplit_proto::pb::trunk_client::TrunkClient;
use lsplit_proto::pb::{self, SessionReply, SessionRequest};
use lsplit_proto::{PROTOCOL_VERSION, codec_to_pb};
use lsplit_remote::{RemoteOptions, RemoteTrunk};
use lsplit_server::{Access, DevCertificates, Limits, ServerOptions, TransportLimits, TrunkServer};
use lsplit_split::{
    DeviceModel, GenerateOptions, LocalTrunk, Obfuscation, SessionKeys, SplitPolicy, Trunk,
};
pub use lsplit_testkit::llm::{model_path, source};
pub use lsplit_testkit::{RunningServer, runtime, tls_access};
use lsplit_wire::Codec;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

pub const TOKEN: &str = "tr0mb0ne";
pub const PROMPT: &str = "The three primary colors are";

/// A trunk server of split 2:28 on loopback, over TLS, requiring [`TOKEN`].
pub fn server(
    certs: &DevCertificates,
    limits: Limits,
    transport: TransportLimits,
) -> RunningServer {
    RunningServer::start(trunk_server(certs, limits, transport), 0, "127.0.0.1", true)
}

/// The trunk server of [`server`], not yet serving.
pub fn trunk_server(
    certs: &DevCertificates,
    limits: Limits,
    transport: TransportLimits,
) -> TrunkServer {
    let source = source(&model_path());
    let plan = SplitPlan::new(2, 28, source.config().num_layers).expect("split");
    let part = source
        .load_part(&plan.trunk(), &Device::Cpu)
        .expect("trunk part");
    let fingerprint = TrunkFingerprint::compute(&source, 2..28).expect("fingerprint");
    let options = ServerOptions {
        limits,
        codecs: Codec::ALL.to_vec(),
        access: Access {
            token: Some(TOKEN.into()),
            transport,
            ..tls_access(certs)
        },
        batch_wait: lsplit_server::DEFAULT_BATCH_WAIT,
    };
    TrunkServer::new(part, fingerprint, options).expect("server")
}

/// A TLS connection to `server`, trusting `certs`' CA.
pub async fn channel(server: &RunningServer, certs: &DevCertificates) -> Result<Channel, String> {
    channel_from(server, certs, None).await
}

/// A TLS connection to `server` from the local address `local` (any loopback address works
/// on Linux, so tests can be several peers).
pub async fn channel_from(
    server: &RunningServer,
    certs: &DevCertificates,
    local: Option<std::net::IpAddr>,
) -> Result<Channel, String> {
    lsplit_testkit::tls_channel(&server.url, &certs.ca_pem, local)
        .await
        .map_err(|e| lsplit_proto::error_chain(&e))
}

pub type Bearer = fn(Request<()>) -> Result<Request<()>, Status>;

pub fn bearer(mut request: Request<()>) -> Result<Request<()>, Status> {
    let value = format!("Bearer {TOKEN}").parse().expect("header");
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

/// A protocol client carrying the valid token.
pub fn client(channel: Channel) -> TrunkClient<InterceptedService<Channel, Bearer>> {
    TrunkClient::with_interceptor(channel, bearer as Bearer)
}

/// A session stream whose requests are sent through `requests`.
pub struct RawStream {
    pub requests: mpsc::Sender<SessionRequest>,
    pub replies: Streaming<SessionReply>,
}

impl RawStream {
    /// Opens a stream and sends nothing on it.
    pub async fn silent(
        client: &mut TrunkClient<InterceptedService<Channel, Bearer>>,
    ) -> Result<Self, Status> {
        let (requests, outbound) = mpsc::channel(4);
        let replies = client
            .session(ReceiverStream::new(outbound))
            .await?
            .into_inner();
        Ok(Self { requests, replies })
    }

    /// The server's next answer on the stream.
    pub async fn next(&mut self) -> Result<Option<ReplyKind>, Status> {
        let reply = tokio::time::timeout(Duration::from_secs(60), self.replies.message())
            .await
            .expect("the server answers in time")?;
        Ok(reply.and_then(|r| r.kind))
    }
}

pub fn keys() -> SessionKeys {
    SessionKeys::fresh(
        SplitPolicy::fixed(SplitPlan::new(2, 28, 30).expect("plan")),
        Obfuscation::None,
    )
}

/// A valid `Open` for the trunk 2:28 (its fingerprint, which hashes the weights, computed
/// once).
pub fn open_request() -> SessionRequest {
    static FINGERPRINT: std::sync::OnceLock<TrunkFingerprint> = std::sync::OnceLock::new();
    let fingerprint = FINGERPRINT.get_or_init(|| {
        TrunkFingerprint::compute(&source(&model_path()), 2..28).expect("fingerprint")
    });
    SessionRequest {
        kind: Some(RequestKind::Open(pb::Open {
            protocol_version: PROTOCOL_VERSION,
            codec: codec_to_pb(Codec::F32) as i32,
            fingerprint_sha256: fingerprint.sha256.to_vec(),
            keys: Some(lsplit_proto::keys_to_pb(&keys())),
        })),
    }
}

/// Eight greedy tokens from [`PROMPT`] with the trunk `trunk` makes from fresh keys.
pub fn generate(
    model: &DeviceModel,
    trunk: impl FnOnce(&SessionKeys) -> Box<dyn Trunk>,
) -> Vec<u32> {
    let prompt = model.prompt_tokens(PROMPT, true).expect("prompt");
    let options = GenerateOptions {
        max_tokens: 8,
        ..GenerateOptions::default()
    };
    let keys = model.new_keys(Obfuscation::None).expect("keys");
    let mut session = model.session(trunk(&keys), &keys).expect("session");
    session
        .generate(&prompt, &options, &mut |_| {})
        .expect("generate")
        .tokens
}

/// The tokens [`generate`] gives with the trunk in this process.
pub fn local_tokens(model: &DeviceModel) -> Vec<u32> {
    generate(model, |keys| {
        let plan = model.plan().expect("split");
        let part = source(&model_path())
            .load_part(&plan.trunk(), &Device::Cpu)
            .expect("trunk");
        Box::new(LocalTrunk::new(Arc::new(part), keys).expect("local trunk"))
    })
}

/// The tokens [`generate`] gives with the trunk on `server`, as a device with the token and
/// `certs`' CA gets them, retrying for `retry_for`.
pub fn remote_tokens(
    model: &DeviceModel,
    server: &RunningServer,
    certs: &DevCertificates,
    retry_for: Duration,
) -> Vec<u32> {
    let mut options = RemoteOptions::new(server.url.clone(), Codec::F32);
    options.ca_pem = Some(certs.ca_pem.clone().into_bytes());
    options.token = Some(TOKEN.into());
    options.retry_for = retry_for;
    generate(model, |keys| {
        Box::new(
            RemoteTrunk::connect(options)
                .expect("connect")
                .with_keys(keys.clone()),
        )
    })
}

/// The device's model of split 2:28.
pub fn device_model() -> DeviceModel {
    lsplit_testkit::llm::device_model(&model_path(), 2, 28, Codec::F32)
}
