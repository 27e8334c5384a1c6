//! Keyed sessions over a real trunk server on loopback TLS: random split points and the
//! permutation, their secret sent in the session's `Open` inside TLS, the server holding the
//! union of the layers any draw may need. Remote output equals in-process output; a server
//! that loses the session mid-generation is rebuilt by replaying the tagged steps; a device
//! and a server holding different secrets stop at the first step with a desync error.

use std::sync::Arc;

use candle_core::Device;
use lsplit_model::{KvPrecision, PartKind, PartSpec};
use lsplit_split::{
    DeviceModel, GenerateOptions, LocalTrunk, Obfuscation, SessionKeys, SessionSecret, SplitPolicy,
    Trunk,
};
use lsplit_testkit::certificates;
use lsplit_testkit::llm::*;
use lsplit_wire::Codec;

fn policy() -> SplitPolicy {
    SplitPolicy::parse("1,2,3,4", "26,27,28,29", 30).expect("policy")
}

fn keys(seed: u8) -> SessionKeys {
    SessionKeys {
        policy: policy(),
        obfuscation: Obfuscation::Permute,
        secret: SessionSecret::from_bytes([seed; 32]),
    }
}

fn keyed_model(codec: Codec) -> DeviceModel {
    policy_model(&source(&model_path()), policy(), codec)
}

fn keyed_generate(model: &DeviceModel, trunk: Box<dyn Trunk>, keys: &SessionKeys) -> Vec<u32> {
    generate_keyed(model, trunk, keys, PROMPT)
}

#[test]
fn remote_keyed_output_equals_in_process_output() {
    let path = model_path();
    let certs = certificates();
    let union = policy().trunk_layers();
    let server = serve(&path, union.start, union.end, tls_options(&certs));
    let model = keyed_model(Codec::F32);
    let keys = keys(1);

    let part = source(&path)
        .load_part(
            &PartSpec {
                kind: PartKind::Trunk,
                layers: union.clone(),
            },
            &Device::Cpu,
        )
        .expect("trunk");
    let local = LocalTrunk::new(Arc::new(part), &keys).expect("local keyed trunk");
    let expected = keyed_generate(&model, Box::new(local), &keys);
    assert_eq!(
        expected,
        in_process(&path, 2, 28, Codec::F32),
        "keyed equals plain"
    );

    let remote = remote(&path, client_options(&server, &certs, Codec::F32))
        .expect("connect")
        .with_keys(keys.clone());
    assert_eq!(remote.layers(), union);
    assert_eq!(keyed_generate(&model, Box::new(remote), &keys), expected);
}

#[test]
fn a_keyed_session_is_replayed_onto_a_restarted_server() {
    let path = model_path();
    let certs = &certificates();
    let union = policy().trunk_layers();
    let server = serve(&path, union.start, union.end, tls_options(certs));
    let model = keyed_model(Codec::F16);
    let keys = keys(2);
    let mut options = client_options(&server, certs, Codec::F16);
    options.retry_for = std::time::Duration::from_secs(30);

    let steady = remote(&path, options.clone())
        .expect("connect")
        .with_keys(keys.clone());
    let expected = keyed_generate(&model, Box::new(steady), &keys);

    let inner = remote(&path, options)
        .expect("connect")
        .with_keys(keys.clone());
    let killed = RestartedMidway::new(Box::new(inner), server, 4, &path, tls_options(certs));
    assert_eq!(keyed_generate(&model, Box::new(killed), &keys), expected);
}

#[test]
fn a_server_restarted_with_another_kv_precision_is_refused() {
    let path = model_path();
    let certs = &certificates();
    let union = policy().trunk_layers();
    let server = serve(&path, union.start, union.end, tls_options(certs));
    let model = keyed_model(Codec::F32);
    let keys = keys(6);
    let mut options = client_options(&server, certs, Codec::F32);
    options.retry_for = std::time::Duration::from_secs(30);
    let inner = remote(&path, options)
        .expect("connect")
        .with_keys(keys.clone());
    let killed = RestartedMidway::new(Box::new(inner), server, 3, &path, tls_options(certs))
        .with_kv_precision(KvPrecision::F16);
    let prompt = model.prompt_tokens(PROMPT, true).expect("prompt");
    let options = GenerateOptions {
        max_tokens: MAX_TOKENS,
        ..GenerateOptions::default()
    };
    let mut session = model.session(Box::new(killed), &keys).expect("session");
    let error = session
        .generate(&prompt, &options, &mut |_| {})
        .expect_err("a replay onto other KV precision");
    assert_eq!(
        error.to_string(),
        "trunk: protocol error: the server came back with KV cache precision f16, not KV cache \
         precision f32: the session's replay would compute other text"
    );
}

#[test]
fn different_secrets_stop_at_the_first_step() {
    let path = model_path();
    let certs = certificates();
    let union = policy().trunk_layers();
    let server = serve(&path, union.start, union.end, tls_options(&certs));
    let model = keyed_model(Codec::F32);
    let theirs = remote(&path, client_options(&server, &certs, Codec::F32))
        .expect("connect")
        .with_keys(keys(3));
    let mut session = model.session(Box::new(theirs), &keys(4)).expect("session");
    let prompt = model.prompt_tokens(PROMPT, true).expect("prompt");
    let err = session.forward(&prompt).expect_err("desync");
    assert_eq!(
        err.to_string(),
        "trunk: the trunk server refused: desync: the uplink message of step 0 does not carry \
         this session's tag: the two ends do not share the session secret, or disagree on the \
         step's split points or rows (FailedPrecondition)"
    );

    // A server that does not hold every layer the policy may draw refuses the session.
    let narrow = serve(&path, 2, 28, tls_options(&certs));
    let narrow = remote(&path, client_options(&narrow, &certs, Codec::F32))
        .expect("connect")
        .with_keys(keys(5));
    match model.session(Box::new(narrow), &keys(5)) {
        Ok(_) => panic!("a trunk without the union of layers must be refused"),
        Err(e) => assert_eq!(
            e.to_string(),
            "the trunk does not hold every layer the policy may draw"
        ),
    }
}
