//! The cost of a trunk divided over two servers (layers 2..15 and 15..28) against one server
//! (2..28), on the same cores, over loopback TLS: aggregate decode tok/s of 1 and 16 concurrent
//! devices, round trips per token, and per hop the bytes and mean time of a step (network plus
//! that server's compute). Single and divided alternate over several rounds; medians.
//! Run: `cargo run --release -p lsplit-remote --example divided_bench`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lsplit_remote::RemoteTrunk;
use lsplit_split::{
    DeviceModel, DividedTrunk, GenerateOptions, Hop, Obfuscation, StepRows, Trunk, TrunkError,
};
use lsplit_testkit::RunningServer;
use lsplit_testkit::llm::*;
use lsplit_wire::Codec;

const TOKENS: usize = 32;
const ROUNDS: usize = 5;
const PROMPT_TEXT: &str = "Write a short story about a lighthouse keeper.";

/// What one hop carried and how long its steps took, summed over every session of a run.
#[derive(Debug, Default, Clone, Copy)]
struct HopTotals {
    steps: u64,
    bytes_up: u64,
    bytes_down: u64,
    time: Duration,
}

/// A hop's trunk that adds its steps to `totals`.
struct Timed {
    trunk: Box<dyn Trunk>,
    totals: Arc<Mutex<HopTotals>>,
}

impl Trunk for Timed {
    fn layers(&self) -> std::ops::Range<usize> {
        self.trunk.layers()
    }

    fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError> {
        let started = Instant::now();
        let reply = self.trunk.step(message)?;
        let mut totals = self.totals.lock().expect("totals");
        totals.steps += 1;
        totals.bytes_up += message.rows.bytes.len() as u64;
        totals.bytes_down += reply.rows.bytes.len() as u64;
        totals.time += started.elapsed();
        Ok(reply)
    }
}

/// One generation over `servers` (one per hop of `hops`, in layer order); its token count.
fn generate(
    model: &DeviceModel,
    hops: &[(usize, usize)],
    servers: &[RunningServer],
    totals: &[Arc<Mutex<HopTotals>>],
) -> usize {
    let certs = certs();
    let keys = model.new_keys(Obfuscation::None).expect("keys");
    let last = hops.len() - 1;
    let hops: Vec<Hop> = hops
        .iter()
        .zip(servers)
        .zip(totals)
        .enumerate()
        .map(|(index, ((&(k1, k2), server), totals))| {
            let hop_keys = keys
                .for_hop(k1..k2, index == 0, index == last)
                .expect("keys");
            let remote =
                RemoteTrunk::connect(client_options(server, certs, Codec::F32)).expect("connect");
            let trunk = Box::new(Timed {
                trunk: Box::new(remote.with_keys(hop_keys.clone())),
                totals: totals.clone(),
            });
            Hop {
                trunk,
                keys: hop_keys,
            }
        })
        .collect();
    let trunk: Box<dyn Trunk> = match hops {
        // One server: its session as `--cloud URL` opens it, without the relay.
        mut one if one.len() == 1 => one.remove(0).trunk,
        hops => Box::new(DividedTrunk::new(keys.clone(), hops).expect("divided trunk")),
    };
    let prompt = model.prompt_tokens(PROMPT_TEXT, false).expect("prompt");
    let options = GenerateOptions {
        max_tokens: TOKENS,
        ignore_eos: true,
        ..GenerateOptions::default()
    };
    let mut session = model.session(trunk, &keys).expect("session");
    let generation = session
        .generate(&prompt, &options, &mut |_| {})
        .expect("generate");
    generation.tokens.len()
}

/// The certificates every server of this run trusts.
fn certs() -> &'static lsplit_server::DevCertificates {
    static CERTS: std::sync::OnceLock<lsplit_server::DevCertificates> = std::sync::OnceLock::new();
    CERTS.get_or_init(lsplit_testkit::certificates)
}

/// Aggregate decode tok/s of `sessions` concurrent devices, and each hop's totals.
fn measure(
    model: &DeviceModel,
    hops: &[(usize, usize)],
    servers: &[RunningServer],
    sessions: usize,
) -> (f64, Vec<HopTotals>) {
    let totals: Vec<_> = hops.iter().map(|_| Arc::default()).collect();
    let started = Instant::now();
    let tokens: usize = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..sessions)
            .map(|_| scope.spawn(|| generate(model, hops, servers, &totals)))
            .collect();
        handles.into_iter().map(|h| h.join().expect("device")).sum()
    });
    let rate = tokens as f64 / started.elapsed().as_secs_f64();
    let totals = totals.iter().map(|t| *t.lock().expect("totals")).collect();
    (rate, totals)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let path = model_path();
    let model = device_model(&path, 2, 28, Codec::F32);
    let single = [(2, 28)];
    let divided = [(2, 15), (15, 28)];
    let serve_all = |hops: &[(usize, usize)]| -> Vec<RunningServer> {
        hops.iter()
            .map(|&(k1, k2)| serve(&path, k1, k2, tls_options(certs())))
            .collect()
    };
    let (single_servers, divided_servers) = (serve_all(&single), serve_all(&divided));
    println!(
        "| sessions | single: tok/s | divided: tok/s | divided / single | round trips per token, single / divided |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: |");
    let mut hop_report = Vec::new();
    for sessions in [1, 16] {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut round_trips = (0.0, 0.0);
        for round in 0..ROUNDS {
            let mut run_single = || {
                let (rate, totals) = measure(&model, &single, &single_servers, sessions);
                round_trips.0 = totals[0].steps as f64 / (sessions * TOKENS) as f64;
                a.push(rate);
            };
            let mut run_divided = |report: &mut Vec<_>| {
                let (rate, totals) = measure(&model, &divided, &divided_servers, sessions);
                round_trips.1 =
                    totals.iter().map(|t| t.steps).sum::<u64>() as f64 / (sessions * TOKENS) as f64;
                b.push(rate);
                report.push((sessions, totals));
            };
            if round % 2 == 0 {
                run_single();
                run_divided(&mut hop_report);
            } else {
                run_divided(&mut hop_report);
                run_single();
            }
        }
        let (a, b) = (median(a), median(b));
        println!(
            "| {sessions} | {a:.1} | {b:.1} | {:.2} | {:.2} / {:.2} |",
            b / a,
            round_trips.0,
            round_trips.1
        );
    }
    println!();
    println!(
        "| sessions | hop | layers | steps | bytes up per step | bytes down per step | mean step (ms) |"
    );
    println!("| ---: | ---: | --- | ---: | ---: | ---: | ---: |");
    for sessions in [1, 16] {
        let runs: Vec<_> = hop_report.iter().filter(|(s, _)| *s == sessions).collect();
        for (hop, &(k1, k2)) in divided.iter().enumerate() {
            let steps: u64 = runs.iter().map(|(_, t)| t[hop].steps).sum();
            let up: u64 = runs.iter().map(|(_, t)| t[hop].bytes_up).sum();
            let down: u64 = runs.iter().map(|(_, t)| t[hop].bytes_down).sum();
            let time: Duration = runs.iter().map(|(_, t)| t[hop].time).sum();
            println!(
                "| {sessions} | {} | {k1}..{k2} | {steps} | {:.0} | {:.0} | {:.2} |",
                hop + 1,
                up as f64 / steps as f64,
                down as f64 / steps as f64,
                time.as_secs_f64() * 1e3 / steps as f64
            );
        }
    }
}
