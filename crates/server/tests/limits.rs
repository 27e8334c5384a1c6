//! Session slots and transport limits against clients that hold places without using them
//! (silent streams, many streams or connections from one address, health `Watch` floods), and
//! caps on what a client's lists make the server parse or repeat.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use lsplit_model::{ModelSource, SplitPlan, TrunkFingerprint};
use lsplit_proto::pb::session_reply::Kind as ReplyKind;
use lsplit_proto::pb::session_request::Kind as RequestKind;
use lsplit_proto::pb::trunk_client::TrunkClient;
use lsplit_proto::pb::{self, SessionReply, SessionRequest};
use lsplit_proto::{PROTOCOL_VERSION, codec_to_pb};
use lsplit_remote::{RemoteOptions, RemoteTrunk};
use lsplit_server::{
    DevCertificates, Limits, ServerOptions, TlsFiles, TransportLimits, TrunkServer,
};
use lsplit_split::{
    DeviceModel, GenerateOptions, LocalTrunk, Obfuscation, SessionKeys, SplitPolicy, Trunk,
    load_tokenizer,
};
use lsplit_testkit::RunningServer;
use lsplit_wire::Codec;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

const TOKEN: &str = "tr0mb0ne";
const PROMPT: &str = "The three primary colors are";

fn model_path() -> PathBuf {
    lsplit_fetch::ensure_default_model().expect("the default model (run `lsplit fetch`)")
}

fn source() -> ModelSource {
    ModelSource::open(&model_path()).expect("open the model")
}

/// A trunk server of split 2:28 on loopback, over TLS, requiring [`TOKEN`].
fn server(certs: &DevCertificates, limits: Limits, transport: TransportLimits) -> RunningServer {
    let source = source();
    let plan = SplitPlan::new(2, 28, source.config().num_layers).expect("split");
    let part = source
        .load_part(&plan.trunk(), &Device::Cpu)
        .expect("trunk part");
    let fingerprint = TrunkFingerprint::compute(&source, 2..28).expect("fingerprint");
    let options = ServerOptions {
        limits,
        codecs: Codec::ALL.to_vec(),
        token: Some(TOKEN.into()),
        tls: Some(TlsFiles {
            cert_pem: certs.server_pem.clone().into_bytes(),
            key_pem: certs.server_key.clone().into_bytes(),
            client_ca_pem: None,
        }),
        transport,
        batch_wait: lsplit_server::DEFAULT_BATCH_WAIT,
    };
    let server = TrunkServer::new(part, fingerprint, options).expect("server");
    RunningServer::start(server, 0, "127.0.0.1", true)
}

/// A TLS connection to `server`, trusting `certs`' CA.
async fn channel(server: &RunningServer, certs: &DevCertificates) -> Result<Channel, String> {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&certs.ca_pem));
    tonic::transport::Endpoint::from_shared(server.url.clone())
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| lsplit_proto::error_chain(&e))
}

type Bearer = fn(Request<()>) -> Result<Request<()>, Status>;

fn bearer(mut request: Request<()>) -> Result<Request<()>, Status> {
    let value = format!("Bearer {TOKEN}").parse().expect("header");
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

/// A protocol client carrying the valid token.
fn client(channel: Channel) -> TrunkClient<InterceptedService<Channel, Bearer>> {
    TrunkClient::with_interceptor(channel, bearer as Bearer)
}

/// A session stream whose requests are sent through `requests`.
struct RawStream {
    requests: mpsc::Sender<SessionRequest>,
    replies: Streaming<SessionReply>,
}

impl RawStream {
    /// Opens a stream and sends nothing on it.
    async fn silent(
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
    async fn next(&mut self) -> Result<Option<ReplyKind>, Status> {
        let reply = tokio::time::timeout(Duration::from_secs(60), self.replies.message())
            .await
            .expect("the server answers in time")?;
        Ok(reply.and_then(|r| r.kind))
    }
}

fn keys() -> SessionKeys {
    SessionKeys::fresh(
        SplitPolicy::fixed(SplitPlan::new(2, 28, 30).expect("plan")),
        Obfuscation::None,
    )
}

fn open_request() -> SessionRequest {
    let fingerprint = TrunkFingerprint::compute(&source(), 2..28).expect("fingerprint");
    SessionRequest {
        kind: Some(RequestKind::Open(pb::Open {
            protocol_version: PROTOCOL_VERSION,
            codec: codec_to_pb(Codec::F32) as i32,
            fingerprint_sha256: fingerprint.sha256.to_vec(),
            keys: Some(lsplit_proto::keys_to_pb(&keys())),
        })),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The device's model of split 2:28.
fn device_model() -> DeviceModel {
    let source = source();
    let tokenizer = Arc::new(load_tokenizer(&source).expect("tokenizer"));
    let plan = SplitPlan::new(2, 28, source.config().num_layers).expect("split");
    DeviceModel::split(
        &source,
        SplitPolicy::fixed(plan),
        tokenizer,
        Codec::F32,
        &Device::Cpu,
    )
    .expect("device model")
}

/// Eight greedy tokens from [`PROMPT`] with the trunk `trunk` makes from fresh keys.
fn generate(model: &DeviceModel, trunk: impl FnOnce(&SessionKeys) -> Box<dyn Trunk>) -> Vec<u32> {
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

/// Waits until `condition` holds (each check 20 ms apart, at most a minute).
fn wait_until(condition: impl Fn() -> bool) {
    for _ in 0..3000 {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the condition never held");
}

#[test]
fn two_silent_streams_leave_both_slots_to_a_real_device() {
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let limits = Limits {
        max_sessions: 2,
        ..Limits::default()
    };
    // Long enough that the silent streams are still open while the device runs: the device is
    // served because they hold no slot, not because they were closed.
    let transport = TransportLimits {
        handshake_timeout: Duration::from_secs(600),
        ..TransportLimits::default()
    };
    let server = server(&certs, limits, transport);
    let runtime = runtime();
    let mut silent = runtime.block_on(async {
        let mut client = client(channel(&server, &certs).await.expect("connect"));
        let a = RawStream::silent(&mut client).await.expect("first stream");
        let b = RawStream::silent(&mut client).await.expect("second stream");
        vec![a, b]
    });
    assert_eq!(server.stats.sessions(), 0, "silent streams hold no slot");

    let model = device_model();
    let local = generate(&model, |keys| {
        let source = source();
        let plan = model.plan().expect("split");
        let part = Arc::new(
            source
                .load_part(&plan.trunk(), &Device::Cpu)
                .expect("trunk"),
        );
        Box::new(LocalTrunk::new(part, keys).expect("local trunk"))
    });
    let mut options = RemoteOptions::new(server.url.clone(), Codec::F32);
    options.ca_pem = Some(certs.ca_pem.clone().into_bytes());
    options.token = Some(TOKEN.into());
    options.retry_for = Duration::ZERO;
    let remote = generate(&model, |keys| {
        Box::new(
            RemoteTrunk::connect(options)
                .expect("connect")
                .with_keys(keys.clone()),
        )
    });
    assert_eq!(remote, local, "the device is served, bit for bit");
    assert_eq!(local.len(), 8);

    // The silent streams were open all along; either can still become a session.
    runtime.block_on(async {
        let stream = &mut silent[0];
        stream.requests.send(open_request()).await.expect("send");
        assert!(matches!(
            stream.next().await,
            Ok(Some(ReplyKind::Opened(_)))
        ));
    });
    assert_eq!(server.stats.sessions(), 1);
}

#[test]
fn a_stream_silent_past_the_handshake_timeout_is_closed() {
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let transport = TransportLimits {
        handshake_timeout: Duration::from_millis(300),
        ..TransportLimits::default()
    };
    let server = server(&certs, Limits::default(), transport);
    runtime().block_on(async {
        let mut client = client(channel(&server, &certs).await.expect("connect"));
        let mut stream = RawStream::silent(&mut client).await.expect("stream");
        let status = stream.next().await.expect_err("the stream is closed");
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert_eq!(
            status.message(),
            "no request within 300 ms of opening the stream: it is closed"
        );
    });
    assert_eq!(server.stats.sessions(), 0);
}

#[test]
fn one_address_holds_at_most_its_share_of_sessions() {
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let transport = TransportLimits {
        max_sessions_per_peer: 1,
        ..TransportLimits::default()
    };
    let server = server(&certs, Limits::default(), transport);
    runtime().block_on(async {
        let mut client = client(channel(&server, &certs).await.expect("connect"));
        let mut first = RawStream::silent(&mut client).await.expect("stream");
        first.requests.send(open_request()).await.expect("send");
        assert!(matches!(first.next().await, Ok(Some(ReplyKind::Opened(_)))));
        let status = RawStream::silent(&mut client)
            .await
            .err()
            .expect("a second session from the same address is refused");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "this address already holds its limit of 1 sessions"
        );
    });
}

#[test]
fn health_watches_and_connections_are_capped() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    let certs = DevCertificates::generate(&[]).expect("certificates");
    let transport = TransportLimits {
        max_health_watches: 1,
        max_connections_per_peer: 1,
        ..TransportLimits::default()
    };
    let server = server(&certs, Limits::default(), transport);
    runtime().block_on(async {
        let channel_one = channel(&server, &certs).await.expect("connect");
        let mut health = HealthClient::new(channel_one.clone());
        let request = || HealthCheckRequest {
            service: "lsplit.trunk.v1.Trunk".into(),
        };
        let mut watch = health.watch(request()).await.expect("watch").into_inner();
        let first = watch.message().await.expect("status").expect("a status");
        assert_eq!(first.status, 1, "SERVING");
        let status = health.watch(request()).await.expect_err("a second watch");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "the server already answers its limit of 1 health watches"
        );
        // Checks still answer while the watch is held.
        let check = health.check(request()).await.expect("check").into_inner();
        assert_eq!(check.status, 1);

        // A second connection from this address is closed at once.
        let refused = channel(&server, &certs).await;
        assert!(refused.is_err(), "a second connection was served");
        drop((watch, health, channel_one));
    });
    // Once the first connection is gone, its place is free again.
    wait_until(|| runtime().block_on(channel(&server, &certs)).is_ok());
}

#[test]
fn long_codec_lists_are_refused_before_they_are_parsed() {
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let server = server(&certs, Limits::default(), TransportLimits::default());
    runtime().block_on(async {
        let mut client = client(channel(&server, &certs).await.expect("connect"));
        let handshake = |codecs: Vec<i32>| pb::HandshakeRequest {
            protocol_version: PROTOCOL_VERSION,
            codecs,
        };
        let status = client
            .handshake(handshake(vec![99; 1000]))
            .await
            .expect_err("a list of 1000 codecs");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "the device offers 1000 codec values; at most 32 are accepted"
        );
        let mut codecs = vec![99; 31];
        codecs.push(codec_to_pb(Codec::Int8) as i32);
        let reply = client
            .handshake(handshake(codecs))
            .await
            .expect("32 values, one of them known")
            .into_inner();
        assert_eq!(reply.codec, codec_to_pb(Codec::Int8) as i32);
    });
}
