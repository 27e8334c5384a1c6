use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::ServerError;

/// A development PKI in PEM: a CA, a server certificate it signed, and a client certificate
/// for mutual TLS. What `lsplit cert` writes, and what the tests run their TLS on.
#[derive(Debug, Clone)]
pub struct DevCertificates {
    /// The CA certificate devices verify the server against (`ca.pem`).
    pub ca_pem: String,
    /// The server certificate (`server.pem`), valid for localhost, 127.0.0.1 and the given hosts.
    pub server_pem: String,
    /// The server's private key (`server.key`).
    pub server_key: String,
    /// A client certificate for mutual TLS (`client.pem`).
    pub client_pem: String,
    /// The client's private key (`client.key`).
    pub client_key: String,
}

impl DevCertificates {
    /// Generates fresh keys and certificates; the server certificate names `localhost`,
    /// `127.0.0.1` and every entry of `hosts` (DNS names or IP addresses).
    pub fn generate(hosts: &[String]) -> Result<Self, ServerError> {
        let err = |e: rcgen::Error| ServerError::Tls(format!("generating certificates: {e}"));
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "lambda-split development CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca =
            CertifiedIssuer::self_signed(ca, KeyPair::generate().map_err(err)?).map_err(err)?;

        let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        names.extend(
            hosts
                .iter()
                .filter(|h| !names.contains(h))
                .cloned()
                .collect::<Vec<_>>(),
        );
        let mut server = CertificateParams::new(names).map_err(err)?;
        server
            .distinguished_name
            .push(DnType::CommonName, "lambda-split trunk server");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().map_err(err)?;
        let server_cert = server.signed_by(&server_key, &ca).map_err(err)?;

        let mut client = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        client
            .distinguished_name
            .push(DnType::CommonName, "lambda-split device");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate().map_err(err)?;
        let client_cert = client.signed_by(&client_key, &ca).map_err(err)?;

        Ok(Self {
            ca_pem: ca.pem(),
            server_pem: server_cert.pem(),
            server_key: server_key.serialize_pem(),
            client_pem: client_cert.pem(),
            client_key: client_key.serialize_pem(),
        })
    }
}
