//! A pool of `lsplit serve` processes behind the real HAProxy, run with
//! `deploy/haproxy/trunk-pool.cfg` as it is: sessions spread over the backends, a backend
//! killed mid-generation leaves every device's text unchanged, and a rolling restart under
//! load (`--drain-secs`: health says NOT_SERVING, HAProxy's check takes the backend out, live
//! sessions finish) loses no generation.

mod served;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::Range;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lsplit_remote::RemoteOptions;
use lsplit_split::{
    DeviceModel, GenerateOptions, LocalTrunk, Obfuscation, SessionKeys, StepRows, Trunk, TrunkError,
};
use lsplit_testkit::llm::{concurrent_devices, device_model, generate_from, local_trunk, remote};
use lsplit_testkit::{Haproxy, wait_until};
use lsplit_wire::Codec;
use served::{Pki, Server, file, model, run};

/// The split every backend serves.
const SPLIT: &str = "2:28";
/// Seconds a backend drains (health NOT_SERVING, still accepting) before it stops accepting:
/// several times what HAProxy's checks (every 250 ms, down after 2 failures) take to see it.
const DRAIN_SECS: &str = "3";
/// Tokens each generation makes.
const MAX_TOKENS: usize = 32;
/// The prompts the devices generate from (raw text, no chat template), one per device.
const PROMPTS: [&str; 4] = [
    "The three primary colors are",
    "Water boils at a temperature of",
    "The capital of France is",
    "Once upon a time, in a small village,",
];

/// Two `lsplit serve` backends (draining on SIGTERM, with metrics) behind HAProxy.
struct Pool {
    pki: Pki,
    backends: Vec<Server>,
    haproxy: Haproxy,
}

impl Pool {
    fn start() -> Self {
        let pki = Pki::new();
        let backends: Vec<Server> = (0..2).map(|_| backend(&pki.dir(), 0)).collect();
        let dir = pki.dir();
        let haproxy = Haproxy::start(
            [backends[0].port, backends[1].port],
            &file(&dir, "ca.pem"),
            &dir,
        );
        Self {
            pki,
            backends,
            haproxy,
        }
    }

    /// What devices dial: the balancer, under the name the backends' certificates hold.
    fn options(&self) -> RemoteOptions {
        let mut options = RemoteOptions::new(
            format!("https://localhost:{}", self.haproxy.port),
            Codec::F32,
        );
        options.ca_pem = Some(std::fs::read(file(&self.pki.dir(), "ca.pem")).expect("ca.pem"));
        options.token = Some("tr0mb0ne".into());
        options.retry_for = Duration::from_secs(60);
        options
    }

    /// Sessions opened on each backend since it (last) started.
    fn sessions_total(&self) -> Vec<u64> {
        self.backends
            .iter()
            .map(|b| metric(b, "lsplit_sessions_total"))
            .collect()
    }

    /// The backend holding the one open session.
    fn holder(&self) -> usize {
        let open: Vec<u64> = self
            .backends
            .iter()
            .map(|b| metric(b, "lsplit_sessions_open"))
            .collect();
        assert_eq!(open.iter().sum::<u64>(), 1, "open sessions: {open:?}");
        open.iter().position(|n| *n == 1).expect("a holder")
    }

    /// Kills backend `i` (SIGKILL: its sessions' state is lost) and starts it again on its port.
    fn kill_and_restart(&mut self, i: usize) {
        let old = &mut self.backends[i].child;
        old.kill().expect("kill");
        old.wait().expect("wait");
        self.backends[i] = backend(&self.pki.dir(), self.backends[i].port);
    }
}

/// A backend on `port` (0: a free one) that drains for [`DRAIN_SECS`] on SIGTERM.
fn backend(pki: &Path, port: u16) -> Server {
    Server::start_with(
        pki,
        SPLIT,
        port,
        &["--drain-secs", DRAIN_SECS, "--metrics", "127.0.0.1:0"],
    )
}

/// The value of the unlabelled metric `name` on `backend`'s `/metrics`.
fn metric(backend: &Server, name: &str) -> u64 {
    let addr: SocketAddr = backend.metrics.expect("started with --metrics");
    let mut stream = TcpStream::connect(addr).expect("the metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {response}"))
}

/// A device's generation: tokens and text.
type Generated = (Vec<u32>, String);

/// Generates greedily from `prompt` (raw) in a session with fresh keys, on the trunk `trunk`
/// opens under them.
fn generate(
    model: &DeviceModel,
    prompt: &str,
    trunk: impl FnOnce(&SessionKeys) -> Box<dyn Trunk>,
) -> Generated {
    let keys = model.new_keys(Obfuscation::None).expect("keys");
    let prompt = model.prompt_tokens(prompt, true).expect("prompt");
    let options = GenerateOptions {
        max_tokens: MAX_TOKENS,
        ..GenerateOptions::default()
    };
    let generated = model
        .session(trunk(&keys), &keys)
        .expect("session")
        .generate(&prompt, &options, &mut |_| {})
        .expect("the generation completes");
    (generated.tokens, generated.text)
}

/// A session through the pool, keyed with `keys`.
fn through(path: &Path, options: &RemoteOptions, keys: &SessionKeys) -> Box<dyn Trunk> {
    let trunk = remote(path, options.clone()).expect("connect through HAProxy");
    Box::new(trunk.with_keys(keys.clone()))
}

/// The in-process reference of each prompt in [`PROMPTS`].
fn references(path: &Path, model: &DeviceModel) -> Vec<Generated> {
    let part = local_trunk(path, model);
    PROMPTS
        .iter()
        .map(|prompt| {
            generate(model, prompt, |keys| {
                Box::new(LocalTrunk::new(part.clone(), keys).expect("trunk"))
            })
        })
        .collect()
}

#[test]
fn sessions_spread_over_the_backends_and_every_text_is_the_in_process_one() {
    let pool = Pool::start();
    let path = model();
    let device = device_model(&path, 2, 28, Codec::F32);
    let part = local_trunk(&path, &device);
    let expected: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|prompt| generate_from(&device, Box::new(part.clone()), prompt))
        .collect();
    // Every device connects before any generates, so HAProxy places four connections at once.
    let got = concurrent_devices(&path, &device, &PROMPTS, &pool.options());
    assert_eq!(got, expected);
    // leastconn: the four sessions, open at once, split two and two.
    assert_eq!(pool.sessions_total(), vec![2, 2]);
}

/// A trunk through the pool whose backend (whichever holds the session) is killed before the
/// steps in `kill_at`, and started again on its port, empty.
struct KillsItsBackend {
    inner: Box<dyn Trunk>,
    pool: Arc<Mutex<Pool>>,
    steps: usize,
    kill_at: &'static [usize],
    killed: Arc<Mutex<Vec<usize>>>,
}

impl Trunk for KillsItsBackend {
    fn layers(&self) -> Range<usize> {
        self.inner.layers()
    }

    fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError> {
        if self.kill_at.contains(&self.steps) {
            let mut pool = self.pool.lock().expect("pool");
            let holder = pool.holder();
            pool.kill_and_restart(holder);
            self.killed.lock().expect("killed").push(holder);
        }
        self.steps += 1;
        self.inner.step(message)
    }
}

#[test]
fn a_backend_killed_mid_generation_leaves_the_text_unchanged() {
    let pool = Arc::new(Mutex::new(Pool::start()));
    let path = model();
    let device = device_model(&path, 2, 28, Codec::F32);
    let expected = references(&path, &device);
    let options = pool.lock().expect("pool").options();
    let killed = Arc::new(Mutex::new(Vec::new()));
    for (prompt, expected) in PROMPTS.iter().zip(&expected).take(2) {
        let got = generate(&device, prompt, |keys| {
            Box::new(KillsItsBackend {
                inner: through(&path, &options, keys),
                pool: pool.clone(),
                steps: 0,
                kill_at: &[3, 12],
                killed: killed.clone(),
            })
        });
        assert_eq!(&got, expected);
    }
    // Two generations, the backend holding each killed twice.
    assert_eq!(killed.lock().expect("killed").len(), 4);
}

#[test]
fn a_rolling_restart_under_load_loses_no_generation_and_changes_no_text() {
    let mut pool = Pool::start();
    let path = model();
    let device = device_model(&path, 2, 28, Codec::F32);
    let expected = references(&path, &device);
    let options = pool.options();
    let finished = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let devices: Vec<_> = PROMPTS
            .iter()
            .zip(&expected)
            .map(|(prompt, expected)| {
                let (path, options, device) = (&path, &options, &device);
                let (finished, stop) = (&finished, &stop);
                scope.spawn(move || {
                    // Bounded: at most 60 generations per device.
                    for _ in 0..60 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let got = generate(device, prompt, |keys| through(path, options, keys));
                        assert_eq!(&got, expected, "a generation through the pool changed");
                        finished.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();

        wait_until(|| finished.load(Ordering::SeqCst) >= PROMPTS.len());
        let before = finished.load(Ordering::SeqCst);
        for i in 0..pool.backends.len() {
            let pid = pool.backends[i].child.id().to_string();
            run(Command::new("kill").args(["-TERM", &pid]));
            // HAProxy takes the backend out on its health answer (L7RSP: NOT_SERVING), while
            // it still accepts, not on a refused connection (L4CON) once it stops accepting.
            pool.haproxy.wait_for(i, "DOWN");
            assert_eq!(
                pool.haproxy.stat(i, "check_status").as_deref(),
                Some("L7RSP"),
                "backend {} was not taken out by its health answer: {}",
                i + 1,
                pool.haproxy.log()
            );
            let status = pool.backends[i].child.wait().expect("wait");
            assert!(status.success(), "backend {} exited with {status}", i + 1);
            pool.backends[i] = backend(&pool.pki.dir(), pool.backends[i].port);
            pool.haproxy.wait_for(i, "UP");
        }
        stop.store(true, Ordering::SeqCst);
        for device in devices {
            device.join().expect("a device lost a generation");
        }
        assert!(
            finished.load(Ordering::SeqCst) > before,
            "no generation finished during the restart"
        );
    });
}
