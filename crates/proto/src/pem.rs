//! What the TLS setups of both ends share: the certificates of a PEM file.

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// A PEM file that gives no certificate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PemError {
    /// The file does not parse as PEM.
    #[error("the {what} is not PEM: {reason}")]
    NotPem {
        /// What the file was meant to hold.
        what: &'static str,
        /// The parser's complaint.
        reason: String,
    },
    /// The file parses but holds no certificate.
    #[error("the {what} file holds no certificate")]
    Empty {
        /// What the file was meant to hold.
        what: &'static str,
    },
}

/// Every certificate in `pem`, which must hold at least one; `what` names the file in errors
/// ("client CA", "certificate").
pub fn certificates(
    pem: &[u8],
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::NotPem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PemError::Empty { what });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_certificates_is_refused_by_name() {
        assert_eq!(
            certificates(b"not a certificate", "CA")
                .unwrap_err()
                .to_string(),
            "the CA file holds no certificate"
        );
        let broken = b"-----BEGIN CERTIFICATE-----\nAAAA";
        assert!(
            certificates(broken, "client CA")
                .unwrap_err()
                .to_string()
                .starts_with("the client CA is not PEM: "),
        );
    }
}
