//! The `TrainTrunk` service of `lsplit serve --training` against a hand-driven client over TLS:
//! forward and backward passes equal the in-process trunk's bit for bit with the f32 codec, a
//! backward pass answers the latest forward pass once, malformed or out-of-order requests
//! get statuses that say what is wrong, and a session's state goes with its stream.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use lsplit_model::{DenseTrunk, ModelSource, SplitPlan, TrunkFingerprint};
use lsplit_proto::pb::train_reply::Kind as ReplyKind;
use lsplit_proto::pb::train_request::Kind as RequestKind;
use lsplit_proto::pb::train_trunk_client::TrainTrunkClient;
use lsplit_proto::pb::{self, TrainReply, TrainRequest};
use lsplit_proto::{TRAIN_PROTOCOL_VERSION, codec_to_pb, rows_from_pb, rows_to_pb};
use lsplit_server::{TrainingLimits, TrunkServer};
use lsplit_testkit::llm::tls_options;
use lsplit_testkit::{RunningServer, assert_status, certificates, raw_channel, runtime};
use lsplit_wire::Codec;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

fn tiny() -> Arc<ModelSource> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/data/tiny-llama-hf");
    Arc::new(ModelSource::open(&path).expect("open"))
}

/// Rows `(rows, 64)` of seeded values.
fn rows(rows: usize, seed: u32) -> Tensor {
    let values: Vec<f32> = (0..rows * 64)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    Tensor::from_vec(values, (rows, 64), &Device::Cpu).expect("rows")
}

fn pb_rows(t: &Tensor, start: usize) -> pb::Rows {
    rows_to_pb(&Codec::F32.encode(t, start).expect("encode"))
}

fn values(rows: Option<pb::Rows>) -> Vec<f32> {
    rows_from_pb(rows.expect("rows"))
        .expect("rows")
        .decode(&Device::Cpu)
        .expect("decode")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("values")
}

fn bits(t: &Tensor) -> Vec<f32> {
    t.flatten_all().expect("flat").to_vec1().expect("values")
}

struct Session {
    requests: mpsc::Sender<TrainRequest>,
    replies: Streaming<TrainReply>,
}

impl Session {
    async fn open(
        url: &str,
        certs: &lsplit_server::DevCertificates,
        open: pb::TrainOpen,
    ) -> Result<Self, Status> {
        let mut client = TrainTrunkClient::new(raw_channel(url, certs).await);
        let (requests, outbound) = mpsc::channel(4);
        requests
            .send(TrainRequest {
                kind: Some(RequestKind::Open(open)),
            })
            .await
            .expect("queue");
        let mut replies = client
            .train(ReceiverStream::new(outbound))
            .await?
            .into_inner();
        match replies.message().await?.and_then(|r| r.kind) {
            Some(ReplyKind::Opened(_)) => Ok(Self { requests, replies }),
            other => panic!("expected Opened, got {other:?}"),
        }
    }

    async fn call(&mut self, kind: RequestKind) -> Result<ReplyKind, Status> {
        self.requests
            .send(TrainRequest { kind: Some(kind) })
            .await
            .map_err(|_| Status::unavailable("closed"))?;
        match self.replies.message().await? {
            Some(TrainReply { kind: Some(kind) }) => Ok(kind),
            other => panic!("no reply: {other:?}"),
        }
    }
}

fn forward(pass: u64, t: &Tensor, start: usize) -> RequestKind {
    RequestKind::Forward(pb::Forward {
        pass,
        rows: Some(pb_rows(t, start)),
    })
}

fn backward(pass: u64, t: &Tensor) -> RequestKind {
    RequestKind::Backward(pb::Backward {
        pass,
        grad: Some(pb_rows(t, 0)),
    })
}

#[test]
fn training_passes_match_the_in_process_trunk_and_refuse_what_is_out_of_order() {
    let certs = certificates();
    let source = tiny();
    let plan = SplitPlan::new(1, 3, 4).expect("plan");
    let fingerprint = TrunkFingerprint::compute(&source, 1..3).expect("fingerprint");
    let part = source
        .load_part(&plan.trunk(), &Device::Cpu)
        .expect("trunk part");
    let server = TrunkServer::new(part, fingerprint.clone(), tls_options(&certs))
        .expect("server")
        .with_training(
            source.clone(),
            TrainingLimits {
                activation_bytes: 0,
                weight_bytes: usize::MAX,
                max_rows: 7,
            },
        )
        .expect("training");
    let server = RunningServer::start(server, 0, "localhost", true);
    let open = |version: u32| pb::TrainOpen {
        protocol_version: version,
        codec: codec_to_pb(Codec::F32) as i32,
        fingerprint_sha256: fingerprint.sha256.to_vec(),
    };
    let local = DenseTrunk::new(source.clone(), 1..3, usize::MAX).expect("local trunk");
    let (x, g) = (rows(7, 1), rows(7, 2));
    let (expected_out, kept) = local.forward(&x).expect("forward");
    let expected_grad = local.backward(&kept, &g).expect("backward");

    runtime().block_on(async {
        let mut session = Session::open(&server.url, &certs, open(TRAIN_PROTOCOL_VERSION))
            .await
            .expect("open");
        assert_status(
            session.call(backward(0, &g)).await,
            Code::FailedPrecondition,
            "backward pass 0 has no forward pass: a backward answers the latest forward pass, once",
        );
        // The session ended with that error: a new one.
        let mut session = Session::open(&server.url, &certs, open(TRAIN_PROTOCOL_VERSION))
            .await
            .expect("open");
        match session.call(forward(0, &x, 0)).await.expect("forward") {
            ReplyKind::Forward(out) => {
                assert_eq!(out.pass, 0);
                assert_eq!(values(out.rows), bits(&expected_out));
            }
            other => panic!("{other:?}"),
        }
        // Budget 0 kept only the first layer's input: the second is recomputed, the same bits.
        match session.call(backward(0, &g)).await.expect("backward") {
            ReplyKind::Backward(out) => {
                assert_eq!(out.pass, 0);
                assert_eq!(values(out.grad), bits(&expected_grad));
            }
            other => panic!("{other:?}"),
        }
        assert_status(
            session.call(backward(0, &g)).await,
            Code::FailedPrecondition,
            "backward pass 0 has no forward pass: a backward answers the latest forward pass, once",
        );

        let mut session = Session::open(&server.url, &certs, open(TRAIN_PROTOCOL_VERSION))
            .await
            .expect("open");
        assert_status(
            session.call(forward(0, &x, 3)).await,
            Code::InvalidArgument,
            "forward rows must be 64 values wide from position 0; these are 64 wide from 3",
        );
        let mut session = Session::open(&server.url, &certs, open(TRAIN_PROTOCOL_VERSION))
            .await
            .expect("open");
        session.call(forward(4, &x, 0)).await.expect("forward");
        assert_status(
            session.call(backward(3, &g)).await,
            Code::FailedPrecondition,
            "backward pass 3 has no forward pass: a backward answers the latest forward pass, once",
        );

        // One row past --training-max-rows (7 here).
        let mut session = Session::open(&server.url, &certs, open(TRAIN_PROTOCOL_VERSION))
            .await
            .expect("open");
        assert_status(
            session.call(forward(0, &rows(8, 3), 0)).await,
            Code::ResourceExhausted,
            "a training sequence of 8 positions is past this server's limit of 7 \
             (--training-max-rows)",
        );

        assert_status(
            Session::open(&server.url, &certs, open(9))
                .await
                .map(|_| ()),
            Code::FailedPrecondition,
            "the device speaks training protocol version 9 but this server speaks version 1",
        );
    });

    // Every session went with its stream, and /metrics counts what crossed: rows and gradients
    // of 7 x 64 f32 values (1792 bytes) in: session 1's refused backward (decoded first), session
    // 2's forward, backward and repeated backward, session 4's forward and refused backward; out,
    // session 2's two answers and session 4's one.
    lsplit_testkit::wait_until(|| server.stats.training_sessions() == 0);
    let metrics = server.stats.prometheus();
    for line in [
        "lsplit_training_sessions_open 0",
        "lsplit_training_sessions_total 5",
        "lsplit_training_forward_passes_total 2",
        "lsplit_training_payload_bytes_total{direction=\"in\"} 10752",
        "lsplit_training_payload_bytes_total{direction=\"out\"} 5376",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in\n{metrics}"
        );
    }
}
