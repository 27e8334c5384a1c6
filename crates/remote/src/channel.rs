//! The channel to a trunk server: TLS 1.3 (or plaintext when allowed), the bearer token on
//! every request, and connection failures explained.

use std::time::Duration;

use lsplit_proto::error_chain;
use tonic::Status;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{RemoteError, RemoteOptions, tls};

/// Adds the bearer token to every request.
#[derive(Clone)]
pub(crate) struct Bearer(Option<AsciiMetadataValue>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The bearer interceptor for `options`' token.
pub(crate) fn bearer(options: &RemoteOptions) -> Result<Bearer, RemoteError> {
    match &options.token {
        Some(token) => Ok(Bearer(Some(
            format!("Bearer {}", token.trim())
                .parse()
                .map_err(|_| RemoteError::Config("the token is not printable ASCII".into()))?,
        ))),
        None => Ok(Bearer(None)),
    }
}

/// Opens the channel: TLS 1.3 unless the URL is `http://` and `insecure` allows it. Returns
/// the channel and the TLS version of its connection.
pub(crate) async fn connect(
    options: &RemoteOptions,
) -> Result<(Channel, Option<String>), RemoteError> {
    let url = &options.url;
    let invalid =
        |e: &dyn std::fmt::Display| RemoteError::Config(format!("`{url}` is not a valid URL: {e}"));
    let uri: Uri = url.parse().map_err(|e| invalid(&e))?;
    let configure = |endpoint: Endpoint| {
        endpoint
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
    };
    match uri.scheme_str() {
        Some("https") => {
            let host = uri.host().ok_or_else(|| invalid(&"no host"))?;
            let port = uri.port_u16().unwrap_or(443);
            let authority = uri.authority().ok_or_else(|| invalid(&"no host"))?;
            let config = tls::client_config(
                options.ca_pem.as_deref(),
                options
                    .identity
                    .as_ref()
                    .map(|(cert, key)| (cert.as_slice(), key.as_slice())),
            )?;
            let dialer = tls::TlsDialer::new(host, port, config)?;
            // tonic's connector only adds its own TLS to `https` URIs: dial an `http` URI
            // through our TLS 1.3 dialer, and keep `https` as the origin of the requests.
            let endpoint = Endpoint::from_shared(format!("http://{authority}"))
                .map_err(|e| invalid(&e))?
                .origin(uri.clone());
            let channel = configure(endpoint)
                .connect_with_connector(dialer.service())
                .await
                .map_err(|e| connect_failure(options, error_chain(&e)))?;
            Ok((channel, dialer.negotiated().map(tls::version_name)))
        }
        Some("http") if options.insecure => {
            tracing::warn!(%url, "connecting WITHOUT TLS (--insecure): hidden states travel in plaintext");
            let endpoint = Endpoint::from_shared(url.clone()).map_err(|e| invalid(&e))?;
            let channel = configure(endpoint)
                .connect()
                .await
                .map_err(|e| connect_failure(options, error_chain(&e)))?;
            Ok((channel, None))
        }
        Some("http") => Err(RemoteError::Config(format!(
            "`{url}` is plaintext; use https:// or pass --insecure to send hidden states unencrypted"
        ))),
        _ => Err(RemoteError::Config(format!(
            "`{url}` must start with https:// (or http:// with --insecure)"
        ))),
    }
}

/// A connection failure, with a hint at the usual cause of the transport's terse messages.
pub(crate) fn connect_failure(options: &RemoteOptions, chain: String) -> RemoteError {
    let tls = options.url.starts_with("https://");
    let hint = if !tls {
        " (if the server uses TLS, connect with https://)"
    } else if chain.contains("InvalidContentType") {
        " (the server does not speak TLS: was it started with --insecure?)"
    } else if chain.contains("ProtocolVersion") {
        " (the server does not offer TLS 1.3, which this device requires)"
    } else if [
        "broken pipe",
        "connection reset",
        "received fatal alert",
        "close_notify",
        "unexpected eof",
    ]
    .iter()
    .any(|s| chain.to_lowercase().contains(s))
    {
        " (the server refused the TLS session: if it requires mutual TLS, give a client \
         certificate signed by its client CA)"
    } else {
        ""
    };
    RemoteError::Connect {
        url: options.url.clone(),
        reason: format!("{chain}{hint}"),
    }
}

/// A status's message and the chain of its source.
pub(crate) fn status_chain(status: &Status) -> String {
    use std::error::Error;
    match status.source() {
        Some(source) => format!("{}: {}", status.message(), error_chain(source)),
        None => status.message().to_string(),
    }
}
