//! A network simulator in user space: a TCP forwarder that delivers each direction's bytes
//! after a one-way delay, with jitter and a bandwidth cap, so tests and benchmarks can run the
//! device and the trunk server over a slow link on loopback (netem needs privileges these
//! machines do not have).
//!
//! Bytes keep their order: jitter delays a chunk, never lets it overtake the one before. The
//! cap serialises each direction as a link of that rate does: a chunk leaves once the link has
//! sent the chunks before it, and arrives a delay later.

use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// What the link does to each direction's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Profile {
    /// One-way delay: a round trip costs twice this.
    pub delay: Duration,
    /// Each chunk's delay varies uniformly by up to this much either way (never below zero).
    pub jitter: Duration,
    /// Bytes per second each way; `None` for no cap.
    pub rate: Option<u64>,
}

impl Profile {
    /// A link with round trip `rtt` and nothing else.
    pub fn round_trip(rtt: Duration) -> Self {
        Self {
            delay: rtt / 2,
            ..Self::default()
        }
    }
}

/// Errors of the simulator.
#[derive(Debug, thiserror::Error)]
pub enum NetsimError {
    /// The listening socket could not be set up.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Bytes read at most at once from either side.
const CHUNK: usize = 64 * 1024;
/// Chunks in flight each way before reading stops (backpressure, as a full link gives).
const IN_FLIGHT: usize = 1024;

/// Forwards every connection accepted on `listener` to `target` through `profile`, until the
/// future is dropped.
pub async fn serve(listener: TcpListener, target: SocketAddr, profile: Profile) {
    let mut seed = 0u64;
    loop {
        let (inbound, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors and the like: wait instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        seed += 1;
        tokio::spawn(async move {
            match TcpStream::connect(target).await {
                Ok(outbound) => forward(inbound, outbound, profile, seed).await,
                Err(error) => tracing::warn!(%peer, %target, %error, "cannot reach the target"),
            }
        });
    }
}

/// Both directions of one connection, each through its own simulated link.
async fn forward(inbound: TcpStream, outbound: TcpStream, profile: Profile, seed: u64) {
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    tokio::join!(
        direction(in_read, out_write, profile, seed * 2),
        direction(out_read, in_write, profile, seed * 2 + 1),
    );
}

/// Reads `from`, delivers to `to` as the link would; shuts `to` down when `from` ends.
async fn direction(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, profile: Profile, seed: u64) {
    let (sent, mut arriving) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let reader = async move {
        let mut buffer = vec![0u8; CHUNK];
        while let Ok(n) = from.read(&mut buffer).await {
            if n == 0
                || sent
                    .send((Instant::now(), buffer[..n].to_vec()))
                    .await
                    .is_err()
            {
                break;
            }
        }
    };
    let writer = async move {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut link = Link::new(profile);
        while let Some((read_at, chunk)) = arriving.recv().await {
            let jitter = jitter(&mut rng, profile.jitter);
            tokio::time::sleep_until(link.arrival(read_at, chunk.len(), jitter)).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// A signed jitter in nanoseconds, uniform in `[-jitter, jitter]`.
fn jitter(rng: &mut StdRng, jitter: Duration) -> i128 {
    let span = jitter.as_nanos() as i128;
    if span == 0 {
        0
    } else {
        rng.random_range(-span..=span)
    }
}

/// One direction's link: when it is free to send again, and when the last chunk arrived.
struct Link {
    profile: Profile,
    free_at: Option<Instant>,
    last_arrival: Option<Instant>,
}

impl Link {
    fn new(profile: Profile) -> Self {
        Self {
            profile,
            free_at: None,
            last_arrival: None,
        }
    }

    /// When a chunk of `bytes` read at `read_at` arrives, `jitter_ns` added to its delay.
    fn arrival(&mut self, read_at: Instant, bytes: usize, jitter_ns: i128) -> Instant {
        let leaves = self.free_at.map_or(read_at, |free| free.max(read_at));
        let sent = match self.profile.rate {
            Some(rate) if rate > 0 => leaves + Duration::from_secs_f64(bytes as f64 / rate as f64),
            _ => leaves,
        };
        self.free_at = Some(sent);
        let delay = (self.profile.delay.as_nanos() as i128 + jitter_ns).max(0);
        let arrives = sent + Duration::from_nanos(delay as u64);
        let arrives = self.last_arrival.map_or(arrives, |last| last.max(arrives));
        self.last_arrival = Some(arrives);
        arrives
    }
}

/// A simulator running on 127.0.0.1 in its own runtime and thread, for tests and benchmarks;
/// dropping it stops it and closes every connection through it.
pub struct Netsim {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Netsim {
    /// Listens on a free port of 127.0.0.1 and forwards to `target` through `profile`.
    pub fn start(target: SocketAddr, profile: Profile) -> Result<Self, NetsimError> {
        let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|source| NetsimError::Listen { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| NetsimError::Listen { addr, source })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| NetsimError::Listen { addr, source })?;
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("a runtime for the simulator");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("listener");
                tokio::select! {
                    () = serve(listener, target, profile) => {}
                    _ = stopped => {}
                }
            });
            runtime.shutdown_background();
        });
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address to dial instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Netsim {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn chunks_arrive_a_delay_later_in_order_and_no_faster_than_the_rate() {
        let base = Instant::now();
        let mut link = Link::new(Profile {
            delay: Duration::from_millis(40),
            jitter: Duration::ZERO,
            rate: Some(1000),
        });
        // 100 bytes at 1000 B/s take 100 ms on the wire, then 40 ms of delay.
        assert_eq!(link.arrival(base, 100, 0), at(base, 140));
        // Read 10 ms later, it waits for the link: leaves at 100, sent at 200.
        assert_eq!(link.arrival(at(base, 10), 100, 0), at(base, 240));
        // Jitter never lets a chunk overtake the one before.
        assert_eq!(link.arrival(at(base, 500), 0, -30_000_000), at(base, 510));
        assert_eq!(
            link.arrival(at(base, 600), 0, -600_000_000),
            at(base, 600),
            "a delay never goes below zero"
        );
    }
}
