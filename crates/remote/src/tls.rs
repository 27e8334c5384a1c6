//! TLS 1.3 only: the device's rustls configuration and the connector tonic dials through.
//!
//! tonic's own TLS settings accept TLS 1.2 as well; the trunk protocol requires 1.3, so the
//! device builds its rustls configuration itself and gives tonic finished TLS streams.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, ProtocolVersion, RootCertStore, version};
use tonic::transport::Uri;

use crate::RemoteError;

/// The device's rustls configuration: TLS 1.3 only, ALPN `h2`, trusting `ca_pem` (or the
/// system's roots when `None`), presenting `identity` (certificate and key, PEM) when given.
pub(crate) fn client_config(
    ca_pem: Option<&[u8]>,
    identity: Option<(&[u8], &[u8])>,
) -> Result<Arc<ClientConfig>, RemoteError> {
    let setup = |what: String| RemoteError::Config(format!("TLS setup failed: {what}"));
    let mut roots = RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in lsplit_proto::certificates(pem, "CA")? {
                roots
                    .add(cert)
                    .map_err(|e| setup(format!("the CA is not a usable certificate: {e}")))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for error in &native.errors {
                tracing::debug!(%error, "skipped a system root certificate");
            }
            let (added, _ignored) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                return Err(setup(
                    "no system root certificates found; give the server's CA with --ca".into(),
                ));
            }
        }
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_protocol_versions(&[&version::TLS13])
        .map_err(|e| setup(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => {
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| setup(format!("the client key is not a PEM key: {e}")))?;
            builder
                .with_client_auth_cert(lsplit_proto::certificates(cert, "client certificate")?, key)
                .map_err(|e| setup(format!("the client certificate and key: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Dials `host:port` over TCP and runs a TLS 1.3 handshake for `host`, whatever URI tonic
/// asks for; remembers the protocol version the last handshake agreed.
#[derive(Clone)]
pub(crate) struct TlsDialer {
    host: String,
    port: u16,
    name: ServerName<'static>,
    connector: TlsConnector,
    negotiated: Arc<Mutex<Option<ProtocolVersion>>>,
}

impl TlsDialer {
    /// A dialer for the server `host:port` with `config`.
    pub(crate) fn new(
        host: &str,
        port: u16,
        config: Arc<ClientConfig>,
    ) -> Result<Self, RemoteError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(bare.to_string()).map_err(|e| {
            RemoteError::Config(format!("`{host}` is not a valid TLS server name: {e}"))
        })?;
        Ok(Self {
            host: bare.to_string(),
            port,
            name,
            connector: TlsConnector::from(config),
            negotiated: Arc::new(Mutex::new(None)),
        })
    }

    /// The protocol version of the last completed handshake.
    pub(crate) fn negotiated(&self) -> Option<ProtocolVersion> {
        *self
            .negotiated
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Connects and completes the handshake, insisting on HTTP/2.
    async fn dial(self) -> io::Result<TokioIo<TlsStream<TcpStream>>> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        let stream = self.connector.connect(self.name.clone(), tcp).await?;
        let session = stream.get_ref().1;
        if session.alpn_protocol() != Some(b"h2") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the server did not agree to HTTP/2 (ALPN h2)",
            ));
        }
        *self
            .negotiated
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = session.protocol_version();
        Ok(TokioIo::new(stream))
    }

    /// The connector for `Endpoint::connect_with_connector`.
    pub(crate) fn service(
        &self,
    ) -> impl tower::Service<
        Uri,
        Response = TokioIo<TlsStream<TcpStream>>,
        Error = io::Error,
        Future = impl Future<Output = io::Result<TokioIo<TlsStream<TcpStream>>>> + Send,
    > + Send
    + 'static {
        let dialer = self.clone();
        tower::service_fn(move |_: Uri| dialer.clone().dial())
    }
}

/// A protocol version as people write it: `TLS 1.3`.
pub(crate) fn version_name(version: ProtocolVersion) -> String {
    match version {
        ProtocolVersion::TLSv1_3 => "TLS 1.3".into(),
        ProtocolVersion::TLSv1_2 => "TLS 1.2".into(),
        other => format!("{other:?}"),
    }
}
