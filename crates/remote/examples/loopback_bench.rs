//! Decode speed and bytes per token of the remote trunk over loopback TLS, side by side with
//! the in-process split and the unsplit model (alternated over several rounds, medians), and
//! aggregate throughput of whole devices with
//! concurrent sessions (their heads and tails share the cores with the server: for the
//! server's own throughput, see the `trunk_throughput` example).
//! Run: `cargo run --release -p lsplit-remote --example loopback_bench`.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use lsplit_proto::pb::SessionRequest;
use lsplit_proto::pb::session_request::Kind;
use lsplit_remote::RemoteTrunk;
use lsplit_split::{
    DeviceModel, GenerateOptions, Generation, Obfuscation, StepRows, load_tokenizer,
};
use lsplit_testkit::llm::*;
use lsplit_wire::Codec;
use prost::Message;

const TOKENS: usize = 64;
/// Rounds of the per-codec measures; in each, every codec runs in-process and over the network
/// one after the other (which goes first alternates), so that both see the same load.
const ROUNDS: usize = 7;
const PROMPT_TEXT: &str = "Write a short story about a lighthouse keeper.";

fn run(model: &DeviceModel, trunk: Option<Box<dyn Unkeyed>>) -> Generation {
    let prompt = model.prompt_tokens(PROMPT_TEXT, false).expect("prompt");
    let options = GenerateOptions {
        max_tokens: TOKENS,
        ..GenerateOptions::default()
    };
    let session = match trunk {
        Some(trunk) => {
            let keys = model.new_keys(Obfuscation::None).expect("keys");
            model.session(trunk.keyed(&keys), &keys)
        }
        None => model.unsplit_session(),
    };
    session
        .expect("session")
        .generate(&prompt, &options, &mut |_| {})
        .expect("generate")
}

/// gRPC message bytes of one decode step in `codec`: protobuf plus the 5-byte gRPC prefix.
fn framed_step_bytes(codec: Codec) -> usize {
    let step = StepRows {
        step: 100,
        rows: hidden_rows(codec, 100, 1),
        rewind: 0,
        tag: [0; 16],
    };
    let message = SessionRequest {
        kind: Some(Kind::Step(lsplit_proto::step_to_pb(&step))),
    };
    message.encoded_len() + 5
}

fn main() {
    let path = model_path();
    let source = source(&path);
    let certs = lsplit_testkit::certificates();
    let tokenizer = Arc::new(load_tokenizer(&source).expect("tokenizer"));

    let unsplit = DeviceModel::unsplit(&source, tokenizer, &Device::Cpu).expect("unsplit");
    let server = serve(&path, 2, 28, tls_options(&certs));
    let part = Arc::new(
        source
            .load_part(
                &lsplit_model::SplitPlan::new(2, 28, 30)
                    .expect("plan")
                    .trunk(),
                &Device::Cpu,
            )
            .expect("trunk"),
    );
    let models: Vec<DeviceModel> = Codec::ALL
        .iter()
        .map(|&codec| device_model(&path, 2, 28, codec))
        .collect();
    let mut unsplit_rates = Vec::with_capacity(ROUNDS);
    // Per codec: in-process and loopback rates, and the last round's generations.
    let mut rates = vec![(Vec::new(), Vec::new()); models.len()];
    let mut last: Vec<Option<(Generation, Generation)>> = vec![None; models.len()];
    for round in 0..ROUNDS {
        unsplit_rates.push(run(&unsplit, None).stats.decode_tokens_per_second());
        for (i, (model, &codec)) in models.iter().zip(&Codec::ALL).enumerate() {
            let local = || run(model, Some(Box::new(part.clone())));
            let remote = || {
                let trunk =
                    RemoteTrunk::connect(client_options(&server, &certs, codec)).expect("connect");
                run(model, Some(Box::new(trunk)))
            };
            let (local, remote) = if round % 2 == 0 {
                let l = local();
                (l, remote())
            } else {
                let r = remote();
                (local(), r)
            };
            rates[i].0.push(local.stats.decode_tokens_per_second());
            rates[i].1.push(remote.stats.decode_tokens_per_second());
            last[i] = Some((local, remote));
        }
    }
    println!(
        "unsplit: decode {:.1} tokens/s ({TOKENS} tokens, median of {ROUNDS} rounds)",
        median(&unsplit_rates)
    );
    let reference = last[0].as_ref().expect("a round").0.tokens.clone();
    for (i, &codec) in Codec::ALL.iter().enumerate() {
        let (local_rates, remote_rates) = &rates[i];
        let (local, remote) = last[i].as_ref().expect("a round");
        let ratios: Vec<f64> = remote_rates
            .iter()
            .zip(local_rates)
            .map(|(r, l)| r / l)
            .collect();
        let agree = reference
            .iter()
            .zip(&remote.tokens)
            .take_while(|(a, b)| a == b)
            .count();
        println!(
            "{codec}: in-process split {:.1} tokens/s, loopback TLS {:.1} tokens/s (medians), \
             loopback / in-process {:.2} (median of the rounds' ratios), \
             payload {:.0} B/token up and down, {} B per decode step with protobuf+gRPC framing, \
             same as in-process: {}, greedy agreement with f32: {agree}/{}",
            median(local_rates),
            median(remote_rates),
            median(&ratios),
            remote.stats.bytes_up as f64 / remote.stats.positions() as f64,
            framed_step_bytes(codec),
            local.tokens == remote.tokens,
            remote.tokens.len(),
        );
    }

    let model = Arc::new(device_model(&path, 2, 28, Codec::F16));
    for sessions in [1usize, 4, 16] {
        let start = Instant::now();
        let threads: Vec<_> = (0..sessions)
            .map(|_| {
                let model = model.clone();
                let options = client_options(&server, &certs, Codec::F16);
                std::thread::spawn(move || {
                    let trunk = RemoteTrunk::connect(options).expect("connect");
                    run(&model, Some(Box::new(trunk))).tokens.len()
                })
            })
            .collect();
        let tokens: usize = threads
            .into_iter()
            .map(|t| t.join().expect("session"))
            .sum();
        let seconds = start.elapsed().as_secs_f64();
        println!(
            "{sessions} concurrent sessions (f16): {tokens} tokens in {seconds:.1} s = {:.1} tokens/s aggregate, {} steps batched",
            tokens as f64 / seconds,
            server.stats.batched_steps()
        );
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}
