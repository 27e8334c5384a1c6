//! How a device reaches a trunk server: address, TLS, token, timeouts and retry bound, given
//! as values ([`RemoteOptions`]) or as the command line's file paths ([`CloudFiles`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use lsplit_wire::Codec;

use crate::RemoteError;

/// How to reach and authenticate to a trunk server.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// `https://HOST:PORT`, or `http://HOST:PORT` with `insecure`.
    pub url: String,
    /// CA certificate (PEM) the server must chain to; `None` uses the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key (PEM) for servers that require mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Bearer token sent with every request.
    pub token: Option<String>,
    /// Allow a plaintext `http://` URL.
    pub insecure: bool,
    /// Codecs the device accepts, most preferred first.
    pub codecs: Vec<Codec>,
    /// Bound on connecting (TCP and TLS).
    pub connect_timeout: Duration,
    /// Bound on one step's round trip.
    pub step_timeout: Duration,
    /// How long to keep retrying a lost server before giving up.
    pub retry_for: Duration,
}

impl RemoteOptions {
    /// Options with default timeouts for `url`, offering `codec`.
    pub fn new(url: impl Into<String>, codec: Codec) -> Self {
        Self {
            url: url.into(),
            ca_pem: None,
            identity: None,
            token: None,
            insecure: false,
            codecs: vec![codec],
            connect_timeout: Duration::from_secs(10),
            step_timeout: Duration::from_secs(120),
            retry_for: Duration::from_secs(30),
        }
    }
}

/// The command line's way to a trunk server (`--cloud URL --ca --token-file
/// --client-cert --client-key --insecure`): paths, read when connecting.
#[derive(Debug, Clone, Default)]
pub struct CloudFiles {
    /// `https://HOST:PORT`, or `http://HOST:PORT` with `insecure`.
    pub url: String,
    /// CA certificate (PEM) the server must chain to; `None` uses the system's roots.
    pub ca: Option<PathBuf>,
    /// File holding the bearer token.
    pub token_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub client_key: Option<PathBuf>,
    /// Allow a plaintext `http://` URL.
    pub insecure: bool,
}

impl CloudFiles {
    /// Connection options with default timeouts, the files read.
    pub fn options(&self) -> Result<RemoteOptions, RemoteError> {
        let read = |path: &Path| {
            std::fs::read(path)
                .map_err(|e| RemoteError::Config(format!("reading {}: {e}", path.display())))
        };
        let mut options = RemoteOptions::new(self.url.clone(), Codec::F32);
        options.codecs.clear();
        options.ca_pem = self.ca.as_deref().map(read).transpose()?;
        options.token = self
            .token_file
            .as_deref()
            .map(|f| read(f).map(|t| String::from_utf8_lossy(&t).trim().to_string()))
            .transpose()?;
        options.identity = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            (None, None) => None,
            _ => {
                return Err(RemoteError::Config(
                    "--client-cert and --client-key go together".into(),
                ));
            }
        };
        options.insecure = self.insecure;
        Ok(options)
    }
}
