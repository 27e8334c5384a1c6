//! Malformed and hostile session messages, and requests past the server's limits: each gets a
//! gRPC status with a clear message, and other sessions keep being served.

use std::time::Duration;

use lsplit_model::{KvPrecision, SplitPlan, TrunkFingerprint};
use lsplit_proto::pb::session_reply::Kind as ReplyKind;
use lsplit_proto::pb::session_request::Kind as RequestKind;
use lsplit_proto::pb::trunk_client::TrunkClient;
use lsplit_proto::pb::{self, SessionReply, SessionRequest};
use lsplit_proto::{PROTOCOL_VERSION, codec_to_pb, rows_to_pb};
use lsplit_server::ServerOptions;
use lsplit_split::{Obfuscation, SessionKeys, SplitPolicy};
use lsplit_testkit::llm::*;
use lsplit_testkit::{
    assert_garbage_refused, assert_status, certificates, raw_channel, runtime, send_garbage,
    wait_until,
};
use lsplit_wire::Codec;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use tonic_prost::ProstCodec;

struct RawSession {
    requests: mpsc::Sender<SessionRequest>,
    replies: Streaming<SessionReply>,
    /// Steps answered so far: the index of the next one.
    steps: u64,
}

/// The keys of every raw session here: the fixed split 2:28 the servers run.
fn keys() -> &'static SessionKeys {
    static KEYS: std::sync::OnceLock<SessionKeys> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let plan = SplitPlan::new(2, 28, 30).expect("plan");
        SessionKeys::fresh(SplitPolicy::fixed(plan), Obfuscation::None)
    })
}

fn open_request(fingerprint: &TrunkFingerprint, codec: Codec) -> SessionRequest {
    SessionRequest {
        kind: Some(RequestKind::Open(pb::Open {
            protocol_version: PROTOCOL_VERSION,
            codec: codec_to_pb(codec) as i32,
            fingerprint_sha256: fingerprint.sha256.to_vec(),
            keys: Some(lsplit_proto::keys_to_pb(keys())),
        })),
    }
}

/// Step `step` carrying `rows` after forgetting `rewind` positions, tagged as a device would
/// tag it (rows whose header names no codec get no valid tag: the server refuses them before
/// looking at it).
fn step_request(step: u64, rewind: usize, rows: pb::Rows) -> SessionRequest {
    let tag = lsplit_proto::rows_from_pb(rows.clone())
        .map_or([0; 16], |r| keys().uplink_rewinding(step, rewind, r).tag);
    SessionRequest {
        kind: Some(RequestKind::Step(pb::Step {
            step,
            rows: Some(rows),
            tag: tag.to_vec(),
            rewind: rewind as u64,
        })),
    }
}

impl RawSession {
    async fn start(
        client: &mut TrunkClient<Channel>,
        first: SessionRequest,
    ) -> Result<Self, tonic::Status> {
        let (requests, outbound) = mpsc::channel(4);
        requests.send(first).await.expect("queue the first request");
        let replies = client
            .session(ReceiverStream::new(outbound))
            .await?
            .into_inner();
        Ok(Self {
            requests,
            replies,
            steps: 0,
        })
    }

    async fn open(
        client: &mut TrunkClient<Channel>,
        fingerprint: &TrunkFingerprint,
        codec: Codec,
    ) -> Self {
        let mut session = Self::start(client, open_request(fingerprint, codec))
            .await
            .expect("session");
        match session.next().await {
            Ok(ReplyKind::Opened(_)) => session,
            other => panic!("expected Opened, got {other:?}"),
        }
    }

    async fn next(&mut self) -> Result<ReplyKind, tonic::Status> {
        let reply = tokio::time::timeout(Duration::from_secs(60), self.replies.message())
            .await
            .expect("the server answers in time")?;
        Ok(reply.expect("a reply").kind.expect("a reply kind"))
    }

    /// Sends `rows` as the next step and returns the server's answer.
    async fn send(&mut self, rows: pb::Rows) -> Result<ReplyKind, tonic::Status> {
        self.send_rewinding(0, rows).await
    }

    /// Sends `rows` as the next step, which first forgets `rewind` positions.
    async fn send_rewinding(
        &mut self,
        rewind: usize,
        rows: pb::Rows,
    ) -> Result<ReplyKind, tonic::Status> {
        if self
            .requests
            .send(step_request(self.steps, rewind, rows))
            .await
            .is_err()
        {
            return self.next().await;
        }
        let reply = self.next().await;
        if reply.is_ok() {
            self.steps += 1;
        }
        reply
    }
}

#[test]
fn malformed_messages_get_clear_errors_while_a_good_session_completes() {
    let path = model_path();
    let certs = certificates();
    let mut options: ServerOptions = tls_options(&certs);
    options.limits.max_message_bytes = 64 << 10;
    let server = serve(&path, 2, 28, options);
    let fingerprint = TrunkFingerprint::compute(&source(&path), 2..28).expect("fingerprint");

    let good = {
        let path = path.clone();
        let options = client_options(&server, &certs, Codec::F16);
        std::thread::spawn(move || {
            let model = device_model(&path, 2, 28, Codec::F16);
            generate(&model, Box::new(remote(&path, options).expect("connect")))
        })
    };

    runtime().block_on(async {
        let mut client = TrunkClient::new(raw_channel(&server.url, &certs).await);
        let fp = &fingerprint;

        let mut s = RawSession::open(&mut client, fp, Codec::F32).await;
        let mut rows = rows_to_pb(&hidden_rows(Codec::F32, 0, 1));
        rows.width = 100;
        rows.payload.truncate(400);
        assert_status(
            s.send(rows).await,
            Code::InvalidArgument,
            "rows are 100 values wide but the trunk's hidden size is 576",
        );

        let mut s = RawSession::open(&mut client, fp, Codec::F32).await;
        assert_status(
            s.send(rows_to_pb(&hidden_rows(Codec::F16, 0, 2))).await,
            Code::InvalidArgument,
            "rows are encoded in f16 but the session's codec is f32",
        );

        let mut s = RawSession::open(&mut client, fp, Codec::F32).await;
        let mut rows = rows_to_pb(&hidden_rows(Codec::F32, 0, 2));
        rows.payload[(576 + 3) * 4..(576 + 4) * 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
        assert_status(
            s.send(rows).await,
            Code::InvalidArgument,
            "hidden rows contain a non-finite value (row 1, column 3)",
        );

        let mut s = RawSession::open(&mut client, fp, Codec::F32).await;
        let mut rows = rows_to_pb(&hidden_rows(Codec::F32, 0, 1));
        rows.payload.truncate(7);
        assert_status(
            s.send(rows).await,
            Code::InvalidArgument,
            "f32 payload of 7 bytes does not match 1 x 576 rows (2304 bytes expected)",
        );

        let mut s = RawSession::open(&mut client, fp, Codec::F32).await;
        assert!(matches!(
            s.send(rows_to_pb(&hidden_rows(Codec::F32, 0, 3))).await,
            Ok(ReplyKind::Step(_))
        ));
        assert_status(
            s.send(rows_to_pb(&hidden_rows(Codec::F32, 2, 1))).await,
            Code::InvalidArgument,
            "rows start at position 2 but the session is at position 3",
        );

        // A step may forget drafted positions, but never more than the session holds, and its
        // rows must start where the rewind leaves the session.
        let mut s = RawSession::open(&mut client, fp, Codec::F32).await;
        assert!(matches!(
            s.send(rows_to_pb(&hidden_rows(Codec::F32, 0, 3))).await,
            Ok(ReplyKind::Step(_))
        ));
        match s
            .send_rewinding(1, rows_to_pb(&hidden_rows(Codec::F32, 2, 2)))
            .await
        {
            Ok(ReplyKind::Step(out)) => {
                let rows = out.rows.expect("rows");
                assert_eq!((rows.start, rows.rows), (2, 2));
            }
            other => panic!("expected the rewound step's rows, got {other:?}"),
        }
        assert_status(
            s.send_rewinding(5, rows_to_pb(&hidden_rows(Codec::F32, 0, 1)))
                .await,
            Code::FailedPrecondition,
            "step 2 rewinds 5 positions but the session holds 4",
        );
        let mut s = RawSession::open(&mut client, fp, Codec::F32).await;
        assert!(matches!(
            s.send(rows_to_pb(&hidden_rows(Codec::F32, 0, 3))).await,
            Ok(ReplyKind::Step(_))
        ));
        assert_status(
            s.send_rewinding(1, rows_to_pb(&hidden_rows(Codec::F32, 3, 1)))
                .await,
            Code::InvalidArgument,
            "rows start at position 3 but the session is at position 2",
        );

        let mut s = RawSession::open(&mut client, fp, Codec::F32).await;
        let mut rows = rows_to_pb(&hidden_rows(Codec::F32, 0, 1));
        rows.codec = 9;
        assert_status(
            s.send(rows).await,
            Code::InvalidArgument,
            "unknown codec value 9 (expected f32, f16, bf16 or int8)",
        );

        let mut s = RawSession::start(
            &mut client,
            step_request(0, 0, rows_to_pb(&hidden_rows(Codec::F32, 0, 1))),
        )
        .await
        .expect("stream");
        assert_status(
            s.next().await,
            Code::FailedPrecondition,
            "unknown session: rows arrived before the session was opened",
        );

        let mut s = RawSession::open(&mut client, fp, Codec::F32).await;
        let result = s.send(rows_to_pb(&hidden_rows(Codec::F32, 0, 40))).await;
        match result {
            Err(status) => {
                assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
                assert!(
                    status
                        .message()
                        .contains("decoded message length too large"),
                    "{status:?}"
                );
            }
            Ok(reply) => panic!("an oversized message was accepted: {reply:?}"),
        }

        let mut wrong = fp.clone();
        wrong.sha256[0] ^= 1;
        let mut s = RawSession::start(&mut client, open_request(&wrong, Codec::F32))
            .await
            .expect("stream");
        let message = format!(
            "the device expects the trunk with sha256 {} but this server runs {fp}",
            &wrong.hex()[..16]
        );
        assert_status(s.next().await, Code::FailedPrecondition, &message);
    });

    let expected = in_process(&path, 2, 28, Codec::F16);
    assert_eq!(good.join().expect("the good session"), expected);
    wait_until(|| server.stats.sessions() == 0 && server.stats.kv_bytes() == 0);
}

#[test]
fn garbage_bytes_and_unknown_methods_are_refused_and_the_server_keeps_serving() {
    let path = model_path();
    let certs = certificates();
    let server = serve(&path, 2, 28, tls_options(&certs));
    runtime().block_on(async {
        let channel = raw_channel(&server.url, &certs).await;
        assert_garbage_refused(
            send_garbage(channel.clone(), "/lsplit.trunk.v1.Trunk/Session").await,
        );
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.expect("ready");
        let path = PathAndQuery::from_static("/lsplit.trunk.v1.Trunk/Image");
        let hello = pb::HandshakeRequest::default();
        let reply = grpc
            .unary::<_, pb::HandshakeReply, _>(
                tonic::Request::new(hello),
                path,
                ProstCodec::default(),
            )
            .await;
        assert_status(
            reply,
            Code::Unimplemented,
            "lsplit.trunk.v1.Trunk has no method /lsplit.trunk.v1.Trunk/Image",
        );
    });
    let model = device_model(&path, 2, 28, Codec::F32);
    let trunk = remote(&path, client_options(&server, &certs, Codec::F32)).expect("connect");
    assert_eq!(
        generate(&model, Box::new(trunk)),
        in_process(&path, 2, 28, Codec::F32)
    );
}

#[test]
fn the_kv_budget_counts_the_trunks_cache_precision() {
    let path = model_path();
    let certs = certificates();
    let config = source(&path).config().clone();
    let (kv_heads, dim) = (config.num_kv_heads, config.head_dim);
    // Bytes per position of the 26 trunk layers' keys and values: f16 2 per value, q8 one per
    // value and a 4-byte scale per 32.
    for (precision, row_bytes) in [
        (KvPrecision::F16, dim * 2),
        (KvPrecision::Q8, dim + dim / 8),
    ] {
        let per_position = 26 * 2 * (kv_heads * row_bytes) as u64;
        let mut options = tls_options(&certs);
        options.limits.kv_budget_bytes = 10 * per_position;
        let server = serve_with_kv(&path, 2, 28, options, precision);
        let fp = TrunkFingerprint::compute(&source(&path), 2..28).expect("fingerprint");
        runtime().block_on(async {
            let mut client = TrunkClient::new(raw_channel(&server.url, &certs).await);
            let mut a = RawSession::open(&mut client, &fp, Codec::F32).await;
            assert!(matches!(
                a.send(rows_to_pb(&hidden_rows(Codec::F32, 0, 6))).await,
                Ok(ReplyKind::Step(_))
            ));
            assert_eq!(server.stats.kv_bytes(), 6 * per_position, "{precision}");
            assert_status(
                a.send(rows_to_pb(&hidden_rows(Codec::F32, 6, 5))).await,
                Code::ResourceExhausted,
                &format!(
                    "the step needs {} more bytes of KV cache but the server's budget of {} \
                     bytes has {} left",
                    5 * per_position,
                    10 * per_position,
                    4 * per_position
                ),
            );
        });
    }
}

#[test]
fn session_context_and_kv_limits_are_enforced() {
    let path = model_path();
    let certs = certificates();
    let config = source(&path).config().clone();
    let per_position = 26 * 2 * (config.num_kv_heads * config.head_dim) as u64 * 4;
    let mut options = tls_options(&certs);
    options.limits.max_sessions = 2;
    options.limits.max_context = 8;
    options.limits.kv_budget_bytes = 10 * per_position;
    let server = serve(&path, 2, 28, options);
    let fp = TrunkFingerprint::compute(&source(&path), 2..28).expect("fingerprint");

    runtime().block_on(async {
        let mut client = TrunkClient::new(raw_channel(&server.url, &certs).await);
        let mut a = RawSession::open(&mut client, &fp, Codec::F32).await;
        let mut b = RawSession::open(&mut client, &fp, Codec::F32).await;
        let third = RawSession::start(&mut client, open_request(&fp, Codec::F32)).await;
        match third {
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                assert_eq!(
                    status.message(),
                    "the server already serves its limit of 2 sessions"
                );
            }
            Ok(_) => panic!("a third session was accepted"),
        }

        assert!(matches!(
            a.send(rows_to_pb(&hidden_rows(Codec::F32, 0, 6))).await,
            Ok(ReplyKind::Step(_))
        ));
        assert_eq!(server.stats.kv_bytes(), 6 * per_position);
        assert_status(
            b.send(rows_to_pb(&hidden_rows(Codec::F32, 0, 5))).await,
            Code::ResourceExhausted,
            &format!(
                "the step needs {} more bytes of KV cache but the server's budget of {} bytes \
                 has {} left",
                5 * per_position,
                10 * per_position,
                4 * per_position
            ),
        );
        assert_status(
            a.send(rows_to_pb(&hidden_rows(Codec::F32, 6, 3))).await,
            Code::ResourceExhausted,
            "the session would reach 9 positions, past this server's limit of 8",
        );
        wait_until(|| server.stats.sessions() == 0 && server.stats.kv_bytes() == 0);
    });
}

#[test]
fn idle_sessions_are_reclaimed() {
    let path = model_path();
    let certs = certificates();
    let mut options = tls_options(&certs);
    options.limits.idle_timeout = Duration::from_millis(300);
    let server = serve(&path, 2, 28, options);
    let fp = TrunkFingerprint::compute(&source(&path), 2..28).expect("fingerprint");

    runtime().block_on(async {
        let mut client = TrunkClient::new(raw_channel(&server.url, &certs).await);
        let mut c = RawSession::open(&mut client, &fp, Codec::F32).await;
        assert!(matches!(
            c.send(rows_to_pb(&hidden_rows(Codec::F32, 0, 2))).await,
            Ok(ReplyKind::Step(_))
        ));
        match c.next().await {
            Err(status) => {
                assert_eq!(status.code(), Code::DeadlineExceeded);
                assert!(
                    status
                        .message()
                        .ends_with("was idle for 300 ms: closed and its KV cache freed"),
                    "{status:?}"
                );
            }
            Ok(reply) => panic!("an idle session got {reply:?}"),
        }
        wait_until(|| server.stats.sessions() == 0 && server.stats.kv_bytes() == 0);
    });
}
