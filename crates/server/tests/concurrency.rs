//! Many devices on one trunk server at once, their steps batched together: each gets exactly
//! its solo output.

use lsplit_remote::RemoteTrunk;
use lsplit_split::{DeviceModel, Obfuscation, SplitPolicy, Trunk};
use lsplit_testkit::certificates;
use lsplit_testkit::llm::*;
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

/// Runs one device per prompt at once against a server of layers `k1..28` and asserts that
/// each gets its solo in-process output, and that the server batched some of their steps.
fn assert_batched_outputs_equal_solo(model: &DeviceModel, k1: usize, prompts: &[&str]) {
    let path = model_path();
    let certs = certificates();
    let part = local_trunk(&path, model);
    let solo: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| generate_from(model, Box::new(part.clone()), p))
        .collect();

    let server = serve(&path, k1, 28, tls_options(&certs));
    let options = client_options(&server, &certs, Codec::F32);
    let outputs = concurrent_devices(&path, model, prompts, &options);
    for ((output, expected), prompt) in outputs.iter().zip(&solo).zip(prompts) {
        assert_eq!(output, expected, "{prompt}");
    }
    assert!(
        server.stats.batched_steps() > 0,
        "no two sessions' steps ever shared a batch"
    );
}

#[test]
fn eight_concurrent_devices_each_get_their_solo_output() {
    let model = device_model(&model_path(), 2, 28, Codec::F32);
    assert_batched_outputs_equal_solo(&model, 2, &PROMPTS);
}

/// Random sessions whose draws give the trunk its whole part (here K1 = 1 of {1, 2}, K2 = 28)
/// run those steps in the server's batches with other sessions' steps, and each still gets
/// exactly its solo output.
#[test]
fn random_sessions_join_the_batches_when_their_draw_allows() {
    let policy = SplitPolicy::parse("1,2", "28", 30).expect("policy");
    let model = policy_model(&source(&model_path()), policy, Codec::F32);
    assert_batched_outputs_equal_solo(&model, 1, &PROMPTS[..6]);
}

/// The server holds a batch open only for sessions it answered and expects back: one from its
/// answer until its next step arrives, and not after it has gone.
#[test]
fn an_answered_session_is_awaited_until_its_next_step_or_its_end() {
    let path = model_path();
    let certs = certificates();
    let server = serve(&path, 2, 28, tls_options(&certs));
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
