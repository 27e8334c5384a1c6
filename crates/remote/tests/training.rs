//! `RemoteTrainTrunk` against `lsplit serve --training`'s service over loopback TLS: its passes
//! equal the in-process trunk's bit for bit (f32 codec), and a server killed between a forward
//! pass and its backward pass, back on the same port, gets the forward pass replayed before the
//! backward, which then returns the same gradient.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use lsplit_model::{DenseTrunk, ModelSource, SplitPlan, TrunkFingerprint};
use lsplit_remote::RemoteTrainTrunk;
use lsplit_server::{TrainingLimits, TrunkServer};
use lsplit_testkit::llm::tls_options;
use lsplit_testkit::{RunningServer, certificates, client_options};
use lsplit_train::TrainTrunk;
use lsplit_wire::Codec;

fn tiny() -> Arc<ModelSource> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/data/tiny-llama-hf");
    Arc::new(ModelSource::open(&path).expect("open"))
}

/// The tiny model's trunk 1..3 with training, on `port` (0: a free one).
fn serve(
    source: &Arc<ModelSource>,
    certs: &lsplit_server::DevCertificates,
    port: u16,
) -> RunningServer {
    let plan = SplitPlan::new(1, 3, 4).expect("plan");
    let fingerprint = TrunkFingerprint::compute(source, 1..3).expect("fingerprint");
    let part = source.load_part(&plan.trunk(), &Device::Cpu).expect("part");
    let server = TrunkServer::new(part, fingerprint, tls_options(certs))
        .expect("server")
        .with_training(
            source.clone(),
            TrainingLimits {
                activation_bytes: 1 << 20,
                weight_bytes: 0,
                ..TrainingLimits::default()
            },
        )
        .expect("training");
    RunningServer::start(server, port, "localhost", true)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().expect("flat").to_vec1().expect("values")
}

#[test]
fn remote_passes_are_the_local_ones_and_survive_a_restart_between_them() {
    let certs = certificates();
    let source = tiny();
    let server = serve(&source, &certs, 0);
    let port = server.addr.port();
    let mut remote = RemoteTrainTrunk::connect(client_options(&server.url, &certs, Codec::F32))
        .expect("connect");
    assert_eq!(remote.layers(), 1..3);
    remote
        .verify(&TrunkFingerprint::compute(&source, 1..3).expect("fingerprint"))
        .expect("same trunk");

    let local = DenseTrunk::new(source.clone(), 1..3, usize::MAX).expect("local");
    let x = source
        .load_part(&SplitPlan::new(0, 0, 4).expect("plan").head(), &Device::Cpu)
        .expect("embeddings")
        .embed(&[1, 17, 200, 42, 5])
        .expect("embed");
    let g = (x.sin().expect("sin") * 0.5).expect("g");
    let (out, kept) = local.forward(&x).expect("forward");
    let grad = local.backward(&kept, &g).expect("backward");

    assert_eq!(values(&remote.forward(&x).expect("forward")), values(&out));
    assert_eq!(
        values(&remote.backward(&g).expect("backward")),
        values(&grad)
    );

    // Killed after the forward pass: the backward pass reconnects and replays it first.
    assert_eq!(values(&remote.forward(&x).expect("forward")), values(&out));
    server.kill();
    let _server = serve(&source, &certs, port);
    assert_eq!(
        values(&remote.backward(&g).expect("backward")),
        values(&grad)
    );

    // A backward pass answers one forward pass.
    let err = remote.backward(&g).expect_err("no forward pass");
    assert!(
        err.to_string()
            .contains("a backward pass without a forward pass"),
        "{err}"
    );
}
