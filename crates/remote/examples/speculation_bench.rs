//! Decode speed of drafted steps against one-token steps over simulated round trips: a real
//! trunk server (2:28, TLS) behind `lsplit-netsim` at 0, 20, 80 and 150 ms, the device
//! generating greedily from chat prompts and from rewrite and summarize prompts (whose answers
//! repeat their input, where prompt lookup drafts well), for each `--speculate` source. The
//! draft model is the default model itself (the only one at hand with its tokenizer), so `auto`
//! is measured twice: with it, and on a device without a draft model (`auto, no draft`), where
//! it can only choose the sources that need no extra weights. Each prompt runs every source in
//! turn, so that a loaded machine slows them alike.
//! Run: `cargo run --release -p lsplit-remote --example speculation_bench` (`-- --help` for
//! the round trips and the number of prompts).

use std::time::Duration;

use clap::Parser;

use lsplit_netsim::{Netsim, Profile};
use lsplit_split::{
    DeviceModel, DraftModel, GenerateOptions, Obfuscation, Speculate, Stats, codecs,
};
use lsplit_testkit::llm::*;
use lsplit_wire::Codec;

/// Tokens generated from each prompt.
const TOKENS: usize = 32;

/// What to measure.
#[derive(Parser)]
struct Args {
    /// Round trips of the simulated link, in milliseconds (0: straight to the server)
    #[arg(long, value_delimiter = ',', default_value = "0,20,80,150")]
    round_trips: Vec<u64>,
    /// Prompts of each set: the first of the 24 built-in chat prompts, and of the 8 rewrites
    /// (all 8 from 8 on)
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=24))]
    prompts: u16,
}

/// Requests whose answers repeat their input.
const REWRITES: [&str; 8] = [
    "Repeat this sentence exactly: the quick brown fox jumps over the lazy dog near the river.",
    "Rewrite in the past tense: I walk to the market, I buy some bread and I go home.",
    "Summarize: The meeting is moved from Monday to Tuesday at ten in the main room. Everyone \
     must bring their reports. The meeting is on Tuesday at ten in the main room.",
    "Correct the spelling: The wether was realy nice and we went to the beech on saturday.",
    "Rewrite politely: Send me the report now. I need the report now.",
    "Turn into a bulleted list: apples, oranges, bananas, grapes and pears.",
    "Repeat after me: one small step for a man, one giant leap for mankind.",
    "Summarize in one sentence: The cat sat on the mat. The cat was happy on the mat. The mat \
     was warm.",
];

/// Totals of one source over one set of prompts.
#[derive(Default)]
struct Total {
    tokens: usize,
    steps: usize,
    decode: Duration,
    bytes: u64,
    positions: usize,
}

impl Total {
    fn add(&mut self, stats: &Stats) {
        self.tokens += stats.decode_tokens;
        self.steps += stats.decode_steps;
        self.decode += stats.decode;
        self.bytes += stats.bytes_up + stats.bytes_down;
        self.positions += stats.positions();
    }

    fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.decode.as_secs_f64()
    }
}

fn main() {
    let args = Args::parse();
    let prompts = usize::from(args.prompts);
    let path = model_path();
    let certs = lsplit_testkit::certificates();
    let free = device_model(&path, 2, 28, Codec::F32);
    let draft = DraftModel::load(&path, free.tokenizer(), &candle_core::Device::Cpu)
        .expect("the draft model");
    let model = device_model(&path, 2, 28, Codec::F32).with_draft_model(draft);
    // Every source on the device with the draft model, then auto on the one without it.
    let runs: Vec<(String, &DeviceModel, Speculate)> = Speculate::ALL
        .into_iter()
        .map(|s| (s.name().to_string(), &model, s))
        .chain([("auto, no draft".to_string(), &free, Speculate::Auto)])
        .collect();
    let server = serve(&path, 2, 28, tls_options(&certs));
    let sets: [(&str, Vec<&str>); 2] = [
        ("chat", codecs::PROMPTS[..prompts].to_vec()),
        ("rewrite", REWRITES[..prompts.min(REWRITES.len())].to_vec()),
    ];
    println!(
        "| round trip | prompts | source | decode tok/s | x off | tokens per round trip | bytes per token |"
    );
    println!("|---:|---|---|---:|---:|---:|---:|");
    for rtt in args.round_trips {
        let link = (rtt > 0).then(|| {
            Netsim::start(server.addr, Profile::round_trip(Duration::from_millis(rtt)))
                .expect("simulated link")
        });
        let port = link
            .as_ref()
            .map_or(server.addr.port(), |l| l.addr().port());
        let url = format!("https://127.0.0.1:{port}");
        let options = lsplit_testkit::client_options(&url, &certs, Codec::F32);
        for (set, prompts) in &sets {
            let mut totals: Vec<Total> = runs.iter().map(|_| Total::default()).collect();
            for prompt in prompts {
                for ((_, device, speculate), total) in runs.iter().zip(&mut totals) {
                    let trunk = remote(&path, options.clone()).expect("connect");
                    total.add(&generate_one(device, trunk, prompt, *speculate));
                }
            }
            let base = totals[0].tokens_per_second();
            for ((speculate, _, _), total) in runs.iter().zip(&totals) {
                let speed = total.tokens_per_second();
                println!(
                    "| {rtt} ms | {set} | {speculate} | {speed:.1} | {:.2} | {:.2} | {:.0} |",
                    speed / base,
                    total.tokens as f64 / total.steps as f64,
                    total.bytes as f64 / total.positions as f64
                );
            }
            eprintln!("done: {rtt} ms {set}");
        }
    }
}

fn generate_one(
    model: &DeviceModel,
    trunk: lsplit_remote::RemoteTrunk,
    prompt: &str,
    speculate: Speculate,
) -> Stats {
    let keys = model.new_keys(Obfuscation::None).expect("keys");
    let prompt = model.prompt_tokens(prompt, false).expect("prompt");
    let options = GenerateOptions {
        max_tokens: TOKENS,
        ignore_eos: true,
        speculate,
        ..GenerateOptions::default()
    };
    let mut session = model
        .session(Box::new(trunk.with_keys(keys.clone())), &keys)
        .expect("session");
    session
        .generate(&prompt, &options, &mut |_| {})
        .expect("generate")
        .stats
}
