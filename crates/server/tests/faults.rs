//! Panics in the trunk's worker, made on demand with the `fault-injection` feature: a panic in
//! a batch fails only that batch's sessions while the server goes on; a dead worker turns the
//! server's health off and ends `serve` with an error (so `lsplit serve` exits non-zero).
//! One test, because the fault flag is process-wide.

use std::sync::mpsc;
use std::time::Duration;

use candle_core::Device;
use lsplit_model::{SplitPlan, TrunkFingerprint};
use lsplit_remote::{ServingStatus, TRUNK_SERVICE, check_health};
use lsplit_server::{ServerError, TrunkServer, fault};
use lsplit_split::{GenerateOptions, Obfuscation};
use lsplit_testkit::certificates;
use lsplit_testkit::llm::*;
use lsplit_wire::Codec;

#[test]
fn a_panicking_batch_fails_its_session_only_and_a_dead_worker_stops_the_server() {
    let path = model_path();
    let certs = certificates();
    let source = source(&path);
    let plan = SplitPlan::new(2, 28, source.config().num_layers).expect("split");
    let part = source
        .load_part(&plan.trunk(), &Device::Cpu)
        .expect("trunk");
    let fingerprint = TrunkFingerprint::compute(&source, 2..28).expect("fingerprint");
    let server = TrunkServer::new(part, fingerprint, tls_options(&certs)).expect("server");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    listener.set_nonblocking(true).expect("nonblocking");
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().expect("addr").port()
    );
    let (ended, serve_result) = mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let result = runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            server.serve(listener, std::future::pending()).await
        });
        let _ = ended.send(result);
    });
    let options = lsplit_testkit::client_options(&url, &certs, Codec::F16);
    let model = device_model(&path, 2, 28, Codec::F16);
    let reference = generate(
        &model,
        Box::new(remote(&path, options.clone()).expect("connect")),
    );
    assert_eq!(reference.len(), MAX_TOKENS);

    // A batch panics: its session gets INTERNAL, and the next session is served as before.
    fault::panic_next_batch();
    let keys = model.new_keys(Obfuscation::None).expect("keys");
    let trunk = Box::new(
        remote(&path, options.clone())
            .expect("connect")
            .with_keys(keys.clone()),
    );
    let prompt = model.prompt_tokens(PROMPT, true).expect("prompt");
    let failed = model
        .session(trunk, &keys)
        .expect("session")
        .generate(&prompt, &GenerateOptions::default(), &mut |_| {})
        .expect_err("the panicking batch's session fails");
    let message = failed.to_string();
    assert!(
        message.contains("the trunk failed on this step's batch"),
        "{message}"
    );
    assert_eq!(
        check_health(&options, TRUNK_SERVICE).expect("health"),
        ServingStatus::Serving
    );
    let again = generate(
        &model,
        Box::new(remote(&path, options.clone()).expect("connect")),
    );
    assert_eq!(
        again, reference,
        "the server serves on, bit for bit as before"
    );

    // The worker dies: `serve` ends with the reason, and health no longer says SERVING.
    fault::kill_worker();
    let mut quick = options.clone();
    quick.retry_for = Duration::ZERO;
    let device = std::thread::spawn(move || {
        let keys = model.new_keys(Obfuscation::None).expect("keys");
        let trunk = Box::new(
            remote(&path, quick)
                .expect("connect")
                .with_keys(keys.clone()),
        );
        model
            .session(trunk, &keys)
            .expect("session")
            .generate(&prompt, &GenerateOptions::default(), &mut |_| {})
            .map(|generation| generation.tokens)
    });
    let result = serve_result
        .recv_timeout(Duration::from_secs(60))
        .expect("serve ends once its worker is dead");
    match result {
        Err(ServerError::Failed(reason)) => {
            assert_eq!(reason, "the trunk worker thread died")
        }
        other => panic!("serve ended with {other:?}"),
    }
    assert!(
        device.join().expect("device thread").is_err(),
        "the step the worker died on is not answered"
    );
    assert!(
        !matches!(
            check_health(&options, TRUNK_SERVICE),
            Ok(ServingStatus::Serving)
        ),
        "a server whose worker died never reports SERVING"
    );
}
