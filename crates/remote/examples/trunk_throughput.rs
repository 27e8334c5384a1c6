//! Aggregate throughput of the trunk server alone with 1, 4 and 16 concurrent sessions.
//!
//! First, 16 real greedy generations (one per prompt, split 2:28, f16, in-process) record every
//! hidden row the device sent up and got back. Then 1, 4 and 16 sessions replay their recorded
//! uplink rows against the real server over loopback TLS, all at once, and check that every
//! downlink row is bit for bit the one of their solo run. The devices do no model work while
//! timed (no head, tail or LM head), so the 2 cores go to the server and the numbers show its
//! batching. Run: `cargo run --release -p lsplit-remote --example trunk_throughput`.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use candle_core::Device;
use lsplit_remote::RemoteTrunk;
use lsplit_server::DevCertificates;
use lsplit_testkit::llm::*;
use lsplit_testkit::{Recording, best, median};
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
                recording.prefill(&mut trunk).expect("prefill");
                barrier.wait();
                recording.decode(&mut trunk, &mut || {}).expect("decode");
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
            .map(|prompt| Recording::record(&model, &part, prompt, DECODE_STEPS))
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
