//! Test support shared by the workspace's tests: certificates, servers of either model kind on
//! loopback, the default model and the tiny diffusion fixtures, so that no test file carries its
//! own copy of the same fixtures.
//!
//! - [`RunningServer`] serves a `TrunkServer` or `DiffusionServer` from its own runtime; killing
//!   or dropping it ends every connection at once, as a crash does.
//! - [`llm`] and [`diffusion`] start those servers on real models and give the in-process
//!   reference a remote result is compared with.
//! - [`raw_channel`], [`send_garbage`] and [`assert_status`] are for hostile-client tests.
//! - [`Haproxy`] runs the real HAProxy with `deploy/haproxy/trunk-pool.cfg` in front of two
//!   servers; [`process`] reads what an `lsplit serve` process announces.
//! - [`Recording`] records a real generation's rows and replays them against a server.

pub mod diffusion;
mod haproxy;
pub mod llm;
pub mod process;
mod raw;
mod recording;
mod running;

use std::time::Duration;

use lsplit_remote::RemoteOptions;
use lsplit_server::{Access, DevCertificates, TlsFiles, TransportLimits};
use lsplit_wire::Codec;

pub use haproxy::Haproxy;
pub use raw::{assert_garbage_refused, assert_status, raw_channel, send_garbage, tls_channel};
pub use recording::Recording;
pub use running::RunningServer;

/// A fresh CA and a server certificate for `localhost` and 127.0.0.1.
pub fn certificates() -> DevCertificates {
    DevCertificates::generate(&[]).expect("certificates")
}

/// The server side of `certs`, without client authentication.
pub fn tls_files(certs: &DevCertificates) -> TlsFiles {
    TlsFiles {
        cert_pem: certs.server_pem.clone().into_bytes(),
        key_pem: certs.server_key.clone().into_bytes(),
        client_ca_pem: None,
    }
}

/// Serving over TLS with `certs`, no token and the default transport caps.
pub fn tls_access(certs: &DevCertificates) -> Access {
    Access {
        token: None,
        tls: Some(tls_files(certs)),
        transport: TransportLimits::default(),
    }
}

/// Device options for `url` trusting `certs`' CA, with short connect and retry bounds.
pub fn client_options(url: &str, certs: &DevCertificates, codec: Codec) -> RemoteOptions {
    let mut options = RemoteOptions::new(url, codec);
    options.ca_pem = Some(certs.ca_pem.clone().into_bytes());
    options.connect_timeout = Duration::from_secs(5);
    options.step_timeout = Duration::from_secs(60);
    options.retry_for = Duration::from_secs(3);
    options
}

/// A small runtime for a test's own async clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Waits until `condition` holds (each check 20 ms apart, at most a minute).
pub fn wait_until(condition: impl Fn() -> bool) {
    for _ in 0..3000 {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the condition never held");
}

/// The median of a benchmark's rounds (the upper middle of an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// The best (largest) of a benchmark's rates.
pub fn best(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}
