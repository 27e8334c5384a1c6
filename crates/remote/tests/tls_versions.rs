//! TLS 1.3 only on the device: a server restricted to TLS 1.2 is refused with a handshake
//! error, and a plaintext connection reports no TLS version.

use std::sync::Arc;
use std::time::Duration;

use lsplit_remote::{RemoteOptions, RemoteTrunk};
use lsplit_testkit::llm::*;
use lsplit_testkit::{certificates, runtime};
use lsplit_wire::Codec;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{ServerConfig, version};

#[test]
fn the_device_refuses_a_server_offering_only_tls_1_2() {
    let certs = certificates();
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
    let certs = certificates();
    let mut options = tls_options(&certs);
    options.access.tls = None;
    let server = serve(&path, 2, 28, options);
    let mut client = client_options(&server, &certs, Codec::F32);
    client.insecure = true;
    let trunk = remote(&path, client).expect("connect with --insecure");
    assert_eq!(trunk.info().tls_version, None);
}
