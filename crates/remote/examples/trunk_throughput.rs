//! Aggregate throughput of the trunk server alone with 1, 4 and 16 concurrent sessions.
//!
//! First, 16 real greedy generations (one per prompt, split 2:28, f16, in-process) record every
//! hidden row the device sent up and got back. Then 1, 4 and 16 sessions replay their recorded
//! uplink rows against the real server over loopback TLS, all at once, and check that every
//! downlink row is bit for bit the one of their solo run. The devices do no model work while
//! timed (no head, tail or LM head), so the 2 cores go to the server and the numbers show its
//! batching. Run: `cargo run --release -p lsplit-remote --example trunk_throughput`.

use std::ops::Range;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use lsplit_model::ModelPart;
use lsplit_remote::RemoteTrunk;
use lsplit_server::DevCertificates;
use lsplit_split::{
    DeviceModel, GreedyRun, LocalTrunk, Obfuscation, SessionKeys, StepRows, Trunk, TrunkError,
};
use lsplit_testkit::llm::*;
use lsplit_wire::Codec;

const PROMPTS: [&str; 16] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Tell me a joke about computers.",
    "How do I make a cup of tea?",
    "Describe a sunset to someone who has never seen one.",
    "List three primary colors.",
    "Give me a tip for sleeping better.",
    "What does HTML stand for?",
    "Summarize the plot of Cinderella in one sentence.",
    "Suggest a name for a pet goldfish.",
    "Write the opening line of a mystery novel.",
    "Compose a short thank-you note to a teacher.",
    "What is the largest planet in the solar system?",
];
/// Decode steps each session replays (timed); its prompt's prefill step runs before the clock.
const DECODE_STEPS: usize = 48;
const CONCURRENCY: [usize; 3] = [1, 4, 16];
/// Rounds of the three measures, interleaved so that each round's three see the same load;
/// the median and the best of each are reported, and the median of each round's ratios.
const ROUNDS: usize = 7;
const CODEC: Codec = Codec::F16;

/// One step of a recorded generation: what the device sent and what the trunk answered.
#[derive(Clone)]
struct Exchange {
    up: StepRows,
    down: StepRows,
}

/// A recorded generation: its session's keys and its exchanges.
struct Recording {
    keys: SessionKeys,
    exchanges: Vec<Exchange>,
}

/// An in-process trunk that records every exchange.
struct RecordingTrunk {
    inner: LocalTrunk,
    log: Arc<Mutex<Vec<Exchange>>>,
}

impl Trunk for RecordingTrunk {
    fn layers(&self) -> Range<usize> {
        self.inner.layers()
    }

    fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError> {
        let down = self.inner.step(message)?;
        self.log.lock().expect("log").push(Exchange {
            up: message.clone(),
            down: down.clone(),
        });
        Ok(down)
    }
}

/// The prefill exchange and then `DECODE_STEPS` decode exchanges of a real generation.
fn record(model: &DeviceModel, part: &Arc<ModelPart>, prompt: &str) -> Recording {
    let log = Arc::new(Mutex::new(Vec::new()));
    let keys = model.new_keys(Obfuscation::None).expect("keys");
    let trunk = RecordingTrunk {
        inner: LocalTrunk::new(part.clone(), &keys).expect("trunk"),
        log: log.clone(),
    };
    let prompt = model.prompt_tokens(prompt, false).expect("prompt");
    let session = model.session(Box::new(trunk), &keys).expect("session");
    // The last of DECODE_STEPS + 1 tokens is chosen from the DECODE_STEPS-th decode exchange.
    GreedyRun::generate(session, &prompt, DECODE_STEPS + 1).expect("generate");
    let exchanges = log.lock().expect("log").clone();
    assert_eq!(exchanges.len(), DECODE_STEPS + 1);
    Recording { keys, exchanges }
}

/// Replays the recordings of the first `sessions` prompts at once; returns the time of their
/// decode steps from the moment all sessions had prefilled.
fn replay(
    server: &lsplit_testkit::RunningServer,
    certs: &DevCertificates,
    recordings: &Arc<Vec<Recording>>,
    sessions: usize,
) -> Duration {
    let barrier = Arc::new(Barrier::new(sessions + 1));
    let threads: Vec<_> = (0..sessions)
        .map(|i| {
            let (recordings, barrier) = (recordings.clone(), barrier.clone());
            let options = client_options(server, certs, CODEC);
            std::thread::spawn(move || {
                let recording = &recordings[i];
                let mut trunk = RemoteTrunk::connect(options)
                    .expect("connect")
                    .with_keys(recording.keys.clone());
                let check = |step: usize, got: StepRows, expected: &StepRows| {
                    assert!(
                        got == *expected,
                        "session {i}: step {step} differs from its solo run"
                    );
                };
                let (prefill, decode) = recording.exchanges.split_first().expect("recording");
                check(0, trunk.step(&prefill.up).expect("prefill"), &prefill.down);
                barrier.wait();
                for (step, exchange) in decode.iter().enumerate() {
                    let got = trunk.step(&exchange.up).expect("decode step");
                    check(step + 1, got, &exchange.down);
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for thread in threads {
        thread.join().expect("session");
    }
    start.elapsed()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn best(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

fn main() {
    let path = model_path();
    let certs = lsplit_testkit::certificates();
    let model = device_model(&path, 2, 28, CODEC);
    let part = Arc::new(
        source(&path)
            .load_part(&model.plan().expect("split").trunk(), &Device::Cpu)
            .expect("trunk"),
    );
    println!("recording {} generations...", PROMPTS.len());
    let recordings: Arc<Vec<Recording>> = Arc::new(
        PROMPTS
            .iter()
            .map(|prompt| record(&model, &part, prompt))
            .collect(),
    );
    drop(part);

    let mut options = tls_options(&certs);
    // Room for the sessions of one measure while those of the previous one are closing.
    options.limits.max_sessions = 4 * PROMPTS.len();
    let server = serve(&path, 2, 28, options);
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); CONCURRENCY.len()];
    let mut batched: Vec<u64> = vec![0; CONCURRENCY.len()];
    let mut batches: Vec<u64> = vec![0; CONCURRENCY.len()];
    for round in 0..ROUNDS {
        for (i, &sessions) in CONCURRENCY.iter().enumerate() {
            let before = (server.stats.batched_steps(), server.stats.batches());
            let time = replay(&server, &certs, &recordings, sessions);
            batched[i] += server.stats.batched_steps() - before.0;
            batches[i] += server.stats.batches() - before.1;
            let steps = sessions * DECODE_STEPS;
            let rate = steps as f64 / time.as_secs_f64();
            println!(
                "round {round}: {sessions} sessions, {steps} decode steps in {:.2} s = {rate:.1} steps/s",
                time.as_secs_f64()
            );
            rates[i].push(rate);
        }
    }

    println!(
        "trunk 2:28 over loopback TLS, {CODEC}, {DECODE_STEPS} decode steps per session, \
         {ROUNDS} rounds; every downlink row bit-identical to its session's solo run"
    );
    println!(
        "| concurrent sessions | aggregate trunk steps/s, median | best round | \
         vs 1 session, median of rounds | best / best of 1 | steps run in shared batches | \
         steps per batch |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (i, &sessions) in CONCURRENCY.iter().enumerate() {
        let ratios: Vec<f64> = rates[i]
            .iter()
            .zip(&rates[0])
            .map(|(r, one)| r / one)
            .collect();
        println!(
            "| {sessions} | {:.1} | {:.1} | {:.2}x | {:.2}x | {} of {} | {:.1} |",
            median(&rates[i]),
            best(&rates[i]),
            median(&ratios),
            best(&rates[i]) / best(&rates[0]),
            batched[i],
            ROUNDS * sessions * (DECODE_STEPS + 1),
            (ROUNDS * sessions * (DECODE_STEPS + 1)) as f64 / batches[i] as f64
        );
    }
}
