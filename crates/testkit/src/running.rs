//! A trunk server of either model kind served on loopback from its own runtime and thread.

use std::net::SocketAddr;
use std::thread::JoinHandle;

use lsplit_server::{Server, ServerStats};
use tokio::sync::oneshot;

/// A server running on 127.0.0.1 in its own runtime; dropping it kills it abruptly.
pub struct RunningServer {
    /// `https://HOST:PORT` or `http://HOST:PORT`, as a device dials it.
    pub url: String,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its live counters.
    pub stats: ServerStats,
    kill: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl RunningServer {
    /// Serves `server` on 127.0.0.1 (port 0 picks a free one), with the network runtime the
    /// server gets by default; the URL names `host` over `https` or, without `tls`, `http`.
    pub fn start<L: Send + 'static>(server: Server<L>, port: u16, host: &str, tls: bool) -> Self {
        let stats = server.stats();
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local address");
        let (kill, killed) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(lsplit_server::default_io_threads())
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                tokio::select! {
                    result = server.serve(listener, std::future::pending()) => result.expect("serve"),
                    _ = killed => {}
                }
            });
            runtime.shutdown_background();
        });
        let scheme = if tls { "https" } else { "http" };
        Self {
            url: format!("{scheme}://{host}:{}", addr.port()),
            addr,
            stats,
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    /// Kills the server: every connection drops, every session's state is lost.
    pub fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.stop();
    }
}
