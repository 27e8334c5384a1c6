//! The trunk pool behind HAProxy (`deploy/haproxy/trunk-pool.cfg`): sessions over one backend
//! against two, each backend an `lsplit serve` process pinned to one core with `taskset`; then
//! generations replayed through the pool while backends are killed N times, and through one
//! rolling restart (`--drain-secs`).
//!
//! The sessions replay real generations recorded in-process (split 2:28, f32: the prompt's
//! prefill and 48 decode steps), so the devices do no model work while timed and every
//! downlink row must be bit for bit the recorded one: a replay that completes gave its text
//! unchanged. Both configurations dial the same HAProxy configuration (for one backend, both of
//! its server lines name it); their rounds alternate.
//!
//! Run: `cargo build --release -p lsplit --bins --examples && target/release/examples/pool_bench`

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use candle_core::Device;
use lsplit_remote::{RemoteOptions, RemoteTrunk};
use lsplit_testkit::llm::{device_model, model_path, source};
use lsplit_testkit::process::announced;
use lsplit_testkit::{Haproxy, Recording, best, median};
use lsplit_wire::Codec;

const PROMPTS: [&str; 8] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "Why is the sky blue?",
    "How do I make a cup of tea?",
    "List three primary colors.",
    "What does HTML stand for?",
    "Suggest a name for a pet goldfish.",
];
/// Decode steps each session replays (timed); its prompt's prefill runs before the clock.
const DECODE_STEPS: usize = 48;
/// Rounds of the two configurations, alternating.
const ROUNDS: usize = 5;
/// Backend kills in the fault run.
const KILLS: usize = 4;
/// Decode steps the pool serves between two kills.
const STEPS_BETWEEN_KILLS: usize = 200;
/// The bearer token the backends require.
const TOKEN: &str = "pool-bench";
/// Seconds a backend drains in the rolling restart.
const DRAIN_SECS: &str = "2";

/// An `lsplit serve` process on one core.
struct Backend {
    child: Child,
    port: u16,
    core: usize,
}

impl Backend {
    /// Serves the trunk 2:28 on `port` (0: a free one), pinned to `core`, with one network
    /// thread and one compute thread.
    fn start(pki: &Path, core: usize, port: u16) -> Self {
        let mut child = Command::new("taskset")
            .args(["-c", &core.to_string()])
            .arg(lsplit())
            .args(["serve", "--split", "2:28", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--cert")
            .arg(pki.join("server.pem"))
            .arg("--key")
            .arg(pki.join("server.key"))
            .arg("--token-file")
            .arg(pki.join("token"))
            .args(["--drain-secs", DRAIN_SECS, "--io-threads", "1"])
            .args(["--max-sessions", "64", "--model"])
            .arg(model_path())
            .env("RAYON_NUM_THREADS", "1")
            .env("LSPLIT_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("taskset lsplit serve (taskset is in Debian's util-linux)");
        let port = announced(&mut child, false).port;
        Self { child, port, core }
    }

    /// Kills the process at once (SIGKILL) and starts another on the same port and core.
    fn kill_and_restart(&mut self, pki: &Path) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
        *self = Self::start(pki, self.core, self.port);
    }

    /// Stops the process as an operator would (SIGTERM: drain, then finish open sessions),
    /// waits until `haproxy` has taken it out as backend `i` and it has exited, and starts
    /// another on the same port and core.
    fn rolling_restart(&mut self, pki: &Path, haproxy: &mut Haproxy, i: usize) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        haproxy.wait_for(i, "DOWN");
        let exit = self.child.wait().expect("wait");
        assert!(exit.success(), "lsplit serve exited with {exit}");
        *self = Self::start(pki, self.core, self.port);
        haproxy.wait_for(i, "UP");
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `lsplit` binary built beside this example.
fn lsplit() -> PathBuf {
    let exe = std::env::current_exe().expect("this example's path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/PROFILE/examples")
        .join("lsplit");
    assert!(
        bin.exists(),
        "{} is missing: build it too (cargo build --release -p lsplit --bins --examples)",
        bin.display()
    );
    bin
}

/// Device options for the pool behind `haproxy`.
fn options(haproxy: &Haproxy, pki: &Path) -> RemoteOptions {
    let mut options = RemoteOptions::new(format!("https://localhost:{}", haproxy.port), Codec::F32);
    options.ca_pem = Some(std::fs::read(pki.join("ca.pem")).expect("ca.pem"));
    options.token = Some(TOKEN.into());
    options.retry_for = Duration::from_secs(60);
    options
}

/// Every recording replayed at once through the pool; the aggregate decode steps per second
/// from the moment all sessions had prefilled.
fn measure(options: &RemoteOptions, recordings: &[Recording]) -> f64 {
    let barrier = Barrier::new(recordings.len() + 1);
    let time = std::thread::scope(|scope| {
        for recording in recordings {
            let barrier = &barrier;
            scope.spawn(move || {
                let mut trunk = RemoteTrunk::connect(options.clone())
                    .expect("connect")
                    .with_keys(recording.keys.clone());
                recording.prefill(&mut trunk).expect("prefill");
                barrier.wait();
                recording.decode(&mut trunk, &mut || {}).expect("decode");
            });
        }
        barrier.wait();
        Instant::now()
    });
    (recordings.len() * DECODE_STEPS) as f64 / time.elapsed().as_secs_f64()
}

/// What the devices of a fault run did.
struct Survival {
    completed: usize,
    lost: usize,
    seconds: f64,
}

/// Every recording replayed again and again through the pool (a fresh session each time)
/// while `faults` runs with the count of decode steps served so far; each replay either
/// completes with every row identical to the recorded one, or is lost.
fn under_faults(
    options: &RemoteOptions,
    recordings: &[Recording],
    faults: impl FnOnce(&AtomicUsize),
) -> Survival {
    let steps = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let (completed, lost) = std::thread::scope(|scope| {
        let devices: Vec<_> = recordings
            .iter()
            .map(|recording| {
                let (steps, stop) = (&steps, &stop);
                scope.spawn(move || {
                    let (mut completed, mut lost) = (0, 0);
                    // Bounded: 200 generations per device at most.
                    for _ in 0..200 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let replayed =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                let mut trunk = RemoteTrunk::connect(options.clone())?
                                    .with_keys(recording.keys.clone());
                                recording.prefill(&mut trunk)?;
                                recording.decode(&mut trunk, &mut || {
                                    steps.fetch_add(1, Ordering::SeqCst);
                                })?;
                                Ok::<_, Box<dyn std::error::Error>>(())
                            }));
                        match replayed {
                            Ok(Ok(())) => completed += 1,
                            Ok(Err(e)) => {
                                eprintln!("a generation was lost: {e}");
                                lost += 1;
                            }
                            Err(_) => lost += 1,
                        }
                    }
                    (completed, lost)
                })
            })
            .collect();
        faults(&steps);
        stop.store(true, Ordering::SeqCst);
        devices
            .into_iter()
            .map(|d| d.join().expect("device"))
            .fold((0, 0), |(c, l), (dc, dl)| (c + dc, l + dl))
    });
    Survival {
        completed,
        lost,
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// Waits until `steps` reaches `target`.
fn wait_for_steps(steps: &AtomicUsize, target: usize) {
    while steps.load(Ordering::SeqCst) < target {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn main() {
    let path = model_path();
    let model = device_model(&path, 2, 28, Codec::F32);
    let part = Arc::new(
        source(&path)
            .load_part(&model.plan().expect("split").trunk(), &Device::Cpu)
            .expect("trunk"),
    );
    println!("recording {} generations...", PROMPTS.len());
    let recordings: Vec<Recording> = PROMPTS
        .iter()
        .map(|prompt| Recording::record(&model, &part, prompt, DECODE_STEPS))
        .collect();
    drop(part);

    let dir = tempfile::tempdir().expect("temp dir");
    let pki = dir.path();
    let certs = lsplit_testkit::certificates();
    for (name, pem) in [
        ("server.pem", &certs.server_pem),
        ("server.key", &certs.server_key),
        ("ca.pem", &certs.ca_pem),
    ] {
        std::fs::write(pki.join(name), pem).expect("PKI file");
    }
    std::fs::write(pki.join("token"), TOKEN).expect("token file");
    let one_dir = tempfile::tempdir().expect("temp dir");
    let two_dir = tempfile::tempdir().expect("temp dir");
    let single = Backend::start(pki, 0, 0);
    let one = Haproxy::start([single.port; 2], &pki.join("ca.pem"), one_dir.path());
    let mut pair = [Backend::start(pki, 0, 0), Backend::start(pki, 1, 0)];
    let mut two = Haproxy::start(
        [pair[0].port, pair[1].port],
        &pki.join("ca.pem"),
        two_dir.path(),
    );

    let (mut rates_one, mut rates_two) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for (name, haproxy, rates) in [
            ("one backend", &one, &mut rates_one),
            ("two backends", &two, &mut rates_two),
        ] {
            let rate = measure(&options(haproxy, pki), &recordings);
            println!("round {round}: {name}: {rate:.1} decode steps/s");
            rates.push(rate);
        }
    }
    let ratios: Vec<f64> = rates_two
        .iter()
        .zip(&rates_one)
        .map(|(two, one)| two / one)
        .collect();
    println!(
        "\n{} sessions at once, {DECODE_STEPS} decode steps each, {ROUNDS} rounds alternating; \
         every downlink row bit-identical to the recording",
        PROMPTS.len()
    );
    println!(
        "| backends (one core each) | aggregate decode steps/s, median | best round | \
         vs one backend, median of rounds |"
    );
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| 1 | {:.1} | {:.1} | 1.00x |",
        median(&rates_one),
        best(&rates_one)
    );
    println!(
        "| 2 | {:.1} | {:.1} | {:.2}x |",
        median(&rates_two),
        best(&rates_two),
        median(&ratios)
    );

    let options = options(&two, pki);
    let kills = under_faults(&options, &recordings, |steps| {
        for kill in 0..KILLS {
            wait_for_steps(steps, (kill + 1) * STEPS_BETWEEN_KILLS);
            pair[kill % 2].kill_and_restart(pki);
        }
        wait_for_steps(steps, (KILLS + 1) * STEPS_BETWEEN_KILLS);
    });
    let restart = under_faults(&options, &recordings, |steps| {
        wait_for_steps(steps, STEPS_BETWEEN_KILLS);
        for (i, backend) in pair.iter_mut().enumerate() {
            backend.rolling_restart(pki, &mut two, i);
        }
    });
    println!("\n| fault (two backends) | generations completed, text unchanged | lost | seconds |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| {KILLS} backend kills (SIGKILL, restarted) | {} | {} | {:.1} |",
        kills.completed, kills.lost, kills.seconds
    );
    println!(
        "| one rolling restart (SIGTERM, --drain-secs {DRAIN_SECS}) | {} | {} | {:.1} |",
        restart.completed, restart.lost, restart.seconds
    );
}
