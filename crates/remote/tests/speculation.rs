//! Steps that check drafted tokens, through a real trunk server over TLS behind a simulated
//! 20 ms round trip: the output is exactly that of one-token steps (greedy and sampled, for
//! every draft source: lookup, lookahead, early exit, a draft model, auto among them), the drafts kept
//! save round trips, a server restarted mid-generation is rebuilt by replaying steps and their rewinds,
//! and sessions that draft still share the server's batches with sessions that do not.

use std::sync::Arc;
use std::time::Duration;

use lsplit_netsim::{Netsim, Profile};
use lsplit_split::{
    DeviceModel, DraftModel, GenerateOptions, Generation, Obfuscation, SamplingParams, Speculate,
    Trunk,
};
use lsplit_testkit::certificates;
use lsplit_testkit::llm::*;
use lsplit_wire::Codec;

/// A rewrite request: its answer repeats much of the prompt, which prompt lookup drafts.
const REWRITE: &str = "<|im_start|>user\nRepeat this sentence exactly: the quick brown fox \
                       jumps over the lazy dog near the old river bank.<|im_end|>\n\
                       <|im_start|>assistant\n";
const TOKENS: usize = 24;

fn run(model: &DeviceModel, trunk: Box<dyn Unkeyed>, speculate: Speculate) -> Generation {
    let keys = model.new_keys(Obfuscation::None).expect("keys");
    run_keyed(model, trunk.keyed(&keys), &keys, speculate)
}

fn run_keyed(
    model: &DeviceModel,
    trunk: Box<dyn Trunk>,
    keys: &lsplit_split::SessionKeys,
    speculate: Speculate,
) -> Generation {
    run_sampled(model, trunk, keys, speculate, SamplingParams::default())
}

fn run_sampled(
    model: &DeviceModel,
    trunk: Box<dyn Trunk>,
    keys: &lsplit_split::SessionKeys,
    speculate: Speculate,
    sampling: SamplingParams,
) -> Generation {
    let prompt = model.prompt_tokens(REWRITE, false).expect("prompt");
    let options = GenerateOptions {
        max_tokens: TOKENS,
        ignore_eos: true,
        speculate,
        sampling,
    };
    model
        .session(trunk, keys)
        .expect("session")
        .generate(&prompt, &options, &mut |_| {})
        .expect("generate")
}

#[test]
fn drafted_steps_over_a_slow_link_give_the_one_token_output_in_fewer_round_trips() {
    let path = model_path();
    let certs = certificates();
    let model = device_model(&path, 2, 28, Codec::F32);
    let expected = run(&model, Box::new(local_trunk(&path, &model)), Speculate::Off);

    let server = serve(&path, 2, 28, tls_options(&certs));
    let link = Netsim::start(server.addr, Profile::round_trip(Duration::from_millis(20)))
        .expect("simulated link");
    let url = format!("https://127.0.0.1:{}", link.addr().port());
    let options = lsplit_testkit::client_options(&url, &certs, Codec::F32);
    for speculate in [
        Speculate::Off,
        Speculate::Lookup,
        Speculate::Lookahead,
        Speculate::Auto,
    ] {
        let trunk = remote(&path, options.clone()).expect("connect through the link");
        let generation = run(&model, Box::new(trunk), speculate);
        assert_eq!(generation.tokens, expected.tokens, "{speculate}");
        let stats = &generation.stats;
        assert_eq!(stats.decode_tokens, TOKENS - 1, "{speculate}");
        if speculate == Speculate::Off {
            assert_eq!(stats.decode_steps, TOKENS - 1);
        } else {
            assert!(stats.accepted_tokens > 0, "{speculate} kept no draft");
            assert_eq!(stats.decode_steps, TOKENS - 1 - stats.accepted_tokens);
        }
    }
}

#[test]
fn early_exit_and_a_draft_model_over_a_slow_link_give_the_one_token_output() {
    let path = model_path();
    let certs = certificates();
    let model = device_model(&path, 2, 28, Codec::F32);
    let draft = DraftModel::load(&path, model.tokenizer(), &candle_core::Device::Cpu)
        .expect("the model as its own draft model");
    let model = model.with_draft_model(draft);
    let server = serve(&path, 2, 28, tls_options(&certs));
    let link = Netsim::start(server.addr, Profile::round_trip(Duration::from_millis(20)))
        .expect("simulated link");
    let url = format!("https://127.0.0.1:{}", link.addr().port());
    let options = lsplit_testkit::client_options(&url, &certs, Codec::F32);
    let sampled = SamplingParams {
        temperature: 0.8,
        seed: 11,
        ..SamplingParams::default()
    };
    for sampling in [SamplingParams::default(), sampled] {
        let generate = |speculate| {
            let trunk = remote(&path, options.clone()).expect("connect through the link");
            let keys = model.new_keys(Obfuscation::None).expect("keys");
            let trunk = trunk.with_keys(keys.clone());
            run_sampled(&model, Box::new(trunk), &keys, speculate, sampling.clone())
        };
        let off = generate(Speculate::Off);
        for speculate in [
            Speculate::EarlyExit,
            Speculate::Draft,
            Speculate::Lookahead,
            Speculate::Auto,
        ] {
            let generation = generate(speculate);
            assert_eq!(generation.tokens, off.tokens, "{speculate}, {sampling:?}");
            let stats = &generation.stats;
            assert_eq!(stats.decode_tokens, TOKENS - 1, "{speculate}");
            assert_eq!(stats.decode_steps, TOKENS - 1 - stats.accepted_tokens);
            assert!(stats.drafted_tokens > 0, "{speculate} drafted nothing");
            if speculate == Speculate::Draft {
                assert!(stats.accepted_tokens > 0, "the draft model kept no draft");
            }
        }
    }
}

#[test]
fn a_drafting_session_is_replayed_onto_a_restarted_server() {
    let path = model_path();
    let certs = certificates();
    let model = device_model(&path, 2, 28, Codec::F16);
    let expected = run(&model, Box::new(local_trunk(&path, &model)), Speculate::Off);

    let server = serve(&path, 2, 28, tls_options(&certs));
    let mut options = client_options(&server, &certs, Codec::F16);
    options.retry_for = Duration::from_secs(30);
    let keys = model.new_keys(Obfuscation::None).expect("keys");
    let inner = remote(&path, options)
        .expect("connect")
        .with_keys(keys.clone());
    // Killed after several drafted steps, some with rewinds.
    let restarted = RestartedMidway::new(Box::new(inner), server, 6, &path, tls_options(&certs));
    let generation = run_keyed(&model, Box::new(restarted), &keys, Speculate::Lookup);
    assert_eq!(generation.tokens, expected.tokens);
    assert!(generation.stats.accepted_tokens > 0);
}

#[test]
fn drafting_and_one_token_sessions_share_batches_and_keep_their_solo_outputs() {
    let path = model_path();
    let certs = certificates();
    let model = Arc::new(device_model(&path, 2, 28, Codec::F32));
    let solo = run(&model, Box::new(local_trunk(&path, &model)), Speculate::Off);
    let server = serve(&path, 2, 28, tls_options(&certs));
    let options = client_options(&server, &certs, Codec::F32);
    let barrier = std::sync::Barrier::new(4);
    let outputs: Vec<Generation> = std::thread::scope(|scope| {
        let devices: Vec<_> = [
            Speculate::Off,
            Speculate::Lookup,
            Speculate::Off,
            Speculate::Lookup,
        ]
        .into_iter()
        .map(|speculate| {
            let (model, options, barrier, path) = (&model, &options, &barrier, &path);
            scope.spawn(move || {
                let trunk = remote(path, options.clone()).expect("connect");
                barrier.wait();
                run(model, Box::new(trunk), speculate)
            })
        })
        .collect();
        devices
            .into_iter()
            .map(|d| d.join().expect("device"))
            .collect()
    });
    for output in &outputs {
        assert_eq!(output.tokens, solo.tokens);
    }
    assert!(server.stats.batched_steps() > 0, "no steps shared a batch");
}
