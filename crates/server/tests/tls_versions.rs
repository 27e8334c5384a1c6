//! TLS 1.3 only on the trunk server: a client restricted to TLS 1.2 is refused with a
//! handshake error, and the server keeps serving.

use std::sync::Arc;

use lsplit_server::DevCertificates;
use lsplit_testkit::llm::*;
use lsplit_testkit::{certificates, runtime};
use lsplit_wire::Codec;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{
    ClientConfig, ProtocolVersion, RootCertStore, SupportedProtocolVersion, version,
};

/// A plain rustls client offering only `versions`, trusting `certs`' CA.
fn client_config(
    certs: &DevCertificates,
    versions: &[&'static SupportedProtocolVersion],
) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(certs.ca_pem.as_bytes()).expect("CA"))
        .expect("add CA");
    let mut config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// Runs a TLS handshake with `config` against `addr`; the negotiated version or the error.
async fn handshake(
    config: ClientConfig,
    addr: std::net::SocketAddr,
) -> std::io::Result<Option<ProtocolVersion>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("name");
    let stream = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    Ok(stream.get_ref().1.protocol_version())
}

#[test]
fn the_server_refuses_a_client_offering_only_tls_1_2() {
    let path = model_path();
    let certs = certificates();
    let server = serve(&path, 2, 28, tls_options(&certs));
    let runtime = runtime();

    let error = runtime
        .block_on(handshake(
            client_config(&certs, &[&version::TLS12]),
            server.addr,
        ))
        .expect_err("a TLS 1.2 client must be refused");
    assert_eq!(error.to_string(), "received fatal alert: ProtocolVersion");

    // The same client offering TLS 1.3 as well gets through, and agrees on 1.3.
    let agreed = runtime
        .block_on(handshake(
            client_config(&certs, &[&version::TLS13, &version::TLS12]),
            server.addr,
        ))
        .expect("a client offering TLS 1.3 is accepted");
    assert_eq!(agreed, Some(ProtocolVersion::TLSv1_3));

    // The server keeps serving after the refusal.
    let trunk = remote(&path, client_options(&server, &certs, Codec::F32)).expect("connect");
    assert_eq!(trunk.info().tls_version.as_deref(), Some("TLS 1.3"));
}
