//! TLS 1.3 only, on both sides: peers restricted to TLS 1.2 are refused with a handshake error.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use lsplit_remote::{RemoteOptions, RemoteTrunk};
use lsplit_server::DevCertificates;
use lsplit_wire::Codec;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{
    ClientConfig, ProtocolVersion, RootCertStore, ServerConfig, SupportedProtocolVersion, version,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

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
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let server = TestServer::start(&path, 2, 28, tls_options(&certs));
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

#[test]
fn the_device_refuses_a_server_offering_only_tls_1_2() {
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let runtime = runtime();
    let listener = runtime
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_protocol_versions(&[&version::TLS12])
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(certs.server_pem.as_bytes()).expect("cert")],
            PrivateKeyDer::from_pem_slice(certs.server_key.as_bytes()).expect("key"),
        )
        .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (refusals, mut refused) = tokio::sync::mpsc::unbounded_channel();
    runtime.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let result = acceptor.accept(tcp).await.map(|_| ());
            let _ = refusals.send(result.map_err(|e| e.to_string()));
        }
    });

    let url = format!("https://127.0.0.1:{}", addr.port());
    let mut options = RemoteOptions::new(url.clone(), Codec::F32);
    options.ca_pem = Some(certs.ca_pem.clone().into_bytes());
    options.connect_timeout = Duration::from_secs(5);
    let message = RemoteTrunk::connect(options)
        .expect_err("a TLS 1.2 server must be refused")
        .to_string();
    assert!(
        message.starts_with(&format!("could not connect to the trunk server at {url}: ")),
        "{message}"
    );
    assert!(
        message.contains("received fatal alert: ProtocolVersion"),
        "{message}"
    );
    assert!(
        message.ends_with("(the server does not offer TLS 1.3, which this device requires)"),
        "{message}"
    );
    let server_side = runtime
        .block_on(refused.recv())
        .expect("the server saw the handshake")
        .expect_err("the server's handshake failed too");
    assert_eq!(
        server_side,
        "peer is incompatible: Tls12NotOfferedOrEnabled"
    );
}

#[test]
fn a_plaintext_connection_reports_no_tls_version() {
    let path = model_path();
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let mut options = tls_options(&certs);
    options.tls = None;
    let server = TestServer::start(&path, 2, 28, options);
    let mut client = client_options(&server, &certs, Codec::F32);
    client.insecure = true;
    let trunk = remote(&path, client).expect("connect with --insecure");
    assert_eq!(trunk.info().tls_version, None);
}
