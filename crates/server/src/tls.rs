//! TLS 1.3 only: the server's rustls configuration.
//!
//! tonic's own TLS settings accept TLS 1.2 as well; the trunk protocol requires 1.3, so the
//! server builds its rustls configuration itself and hands tonic finished TLS streams (see
//! `crate::incoming`).

use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::PrivateKeyDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, version};

use crate::{ServerError, TlsFiles};

/// The server's rustls configuration: TLS 1.3 only, ALPN `h2`, the identity of `files` and,
/// when `files` names a client CA, mandatory client certificates signed by it.
pub(crate) fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, ServerError> {
    let provider = Arc::new(ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&version::TLS13])
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let builder = match &files.client_ca_pem {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in lsplit_proto::certificates(ca, "client CA")? {
                roots.add(cert).map_err(|e| {
                    ServerError::Tls(format!("the client CA is not a usable certificate: {e}"))
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| ServerError::Tls(format!("the client CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let key = PrivateKeyDer::from_pem_slice(&files.key_pem)
        .map_err(|e| ServerError::Tls(format!("the private key is not a PEM key: {e}")))?;
    let mut config = builder
        .with_single_cert(
            lsplit_proto::certificates(&files.cert_pem, "certificate")?,
            key,
        )
        .map_err(|e| ServerError::Tls(format!("the certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The name of a negotiated protocol version, for logs.
pub(crate) fn version_name(version: Option<rustls::ProtocolVersion>) -> String {
    version.map_or_else(|| "none".into(), |v| format!("{v:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DevCertificates;

    fn files(certs: &DevCertificates) -> TlsFiles {
        TlsFiles {
            cert_pem: certs.server_pem.clone().into_bytes(),
            key_pem: certs.server_key.clone().into_bytes(),
            client_ca_pem: Some(certs.ca_pem.clone().into_bytes()),
        }
    }

    #[test]
    fn unusable_files_get_clear_errors() {
        let certs = DevCertificates::generate(&[]).expect("certificates");
        let error = |files: TlsFiles| {
            server_config(&files)
                .expect_err("unusable TLS files")
                .to_string()
        };
        let mut bad = files(&certs);
        bad.key_pem = certs.server_pem.clone().into_bytes();
        assert!(
            error(bad).starts_with("TLS setup failed: the private key is not a PEM key"),
            "a certificate given as the key"
        );
        let mut bad = files(&certs);
        bad.cert_pem = b"not a certificate".to_vec();
        assert_eq!(
            error(bad),
            "TLS setup failed: the certificate file holds no certificate"
        );
        let mut bad = files(&certs);
        bad.client_ca_pem = Some(Vec::new());
        assert_eq!(
            error(bad),
            "TLS setup failed: the client CA file holds no certificate"
        );
        let mut bad = files(&certs);
        bad.key_pem = certs.client_key.clone().into_bytes();
        assert!(
            error(bad).starts_with("TLS setup failed: the certificate and key: "),
            "a key that does not match the certificate"
        );
    }
}
