//! Test support shared by the workspace's tests, so that each test file does not carry its own
//! copy of the same fixtures.
//!
//! [`RunningServer`] serves a trunk server of either model kind (`TrunkServer` or
//! `DiffusionServer`, both `lsplit_server::Server`) on loopback from its own runtime and
//! thread; killing or dropping it ends every connection at once, as a crash does. [`RawBytes`]
//! sends a hostile client's frames as given; [`tls_channel`] connects a raw client.

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

/// A TLS connection to `url`, trusting the CA `ca_pem`, from the local address `local` when
/// given (any loopback address works on Linux, so a test can be several peers).
pub async fn tls_channel(
    url: &str,
    ca_pem: &str,
    local: Option<std::net::IpAddr>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
    tonic::transport::Endpoint::from_shared(url.to_string())?
        .tls_config(tls)?
        .local_address(local)
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
}

/// A gRPC codec that sends frames as given: bytes that need not be a protobuf message at all,
/// for tests of what a server does with a hostile client's garbage.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> Self::Encoder {
        RawBytes
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let len = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, len).to_vec()))
    }
}
