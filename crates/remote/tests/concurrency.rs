//! Many devices on one trunk server at once: each gets exactly its solo output.

mod common;

use std::sync::Arc;

use candle_core::Device;
use common::*;
use lsplit_proto::TrunkFingerprint;
use lsplit_remote::RemoteTrunk;
use lsplit_server::DevCertificates;
use lsplit_split::{Obfuscation, Trunk};
use lsplit_wire::Codec;

const PROMPTS: [&str; 8] = [
    "The three primary colors are",
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at",
    "My favourite animal is",
    "1, 2, 3, 4,",
    "The best way to learn is",
];

#[test]
fn eight_concurrent_devices_each_get_their_solo_output() {
    let path = model_path();
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let model = Arc::new(device_model(&path, 2, 28, Codec::F32));
    let part = Arc::new(
        source(&path)
            .load_part(&model.plan().expect("split").trunk(), &Device::Cpu)
            .expect("trunk"),
    );
    let solo: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| generate_from(&model, Box::new(part.clone()), p))
        .collect();

    let server = TestServer::start(&path, 2, 28, tls_options(&certs));
    let fingerprint =
        Arc::new(TrunkFingerprint::compute(&source(&path), 2..28).expect("fingerprint"));
    let barrier = Arc::new(std::sync::Barrier::new(PROMPTS.len()));
    let devices: Vec<_> = PROMPTS
        .iter()
        .map(|prompt| {
            let (model, barrier, fingerprint) =
                (model.clone(), barrier.clone(), fingerprint.clone());
            let options = client_options(&server, &certs, Codec::F32);
            std::thread::spawn(move || {
                let trunk = RemoteTrunk::connect(options).expect("connect");
                trunk.verify(&fingerprint).expect("same model");
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
        "no two sessions' steps ever shared a batch"
    );
}

/// The server holds a batch open only for sessions it answered and expects back: one from its
/// answer until its next step arrives, and not after it has gone.
#[test]
fn an_answered_session_is_awaited_until_its_next_step_or_its_end() {
    let path = model_path();
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let server = TestServer::start(&path, 2, 28, tls_options(&certs));
    let keys = device_model(&path, 2, 28, Codec::F32)
        .new_keys(Obfuscation::None)
        .expect("keys");
    let mut trunk = RemoteTrunk::connect(client_options(&server, &certs, Codec::F32))
        .expect("connect")
        .with_keys(keys.clone());
    assert_eq!(server.stats.awaited(), 0);
    trunk
        .step(&keys.uplink(0, hidden_rows(Codec::F32, 0, 3)))
        .expect("prefill");
    assert_eq!(server.stats.awaited(), 1);
    trunk
        .step(&keys.uplink(1, hidden_rows(Codec::F32, 3, 1)))
        .expect("decode");
    assert_eq!(server.stats.awaited(), 1);
    assert!(
        server
            .stats
            .prometheus()
            .contains("\nlsplit_sessions_awaited 1\n")
    );
    drop(trunk);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.stats.awaited() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the closed session is still awaited"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
