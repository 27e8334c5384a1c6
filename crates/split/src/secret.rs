//! The per-session secret of a keyed split and the keyed derivations made from it.
//!
//! Device and trunk derive everything they must agree on (each step's split points, the
//! permutation of the hidden dimension, the tags on messages) from 32 secret bytes exchanged
//! inside the encrypted channel when the session opens, with HMAC-SHA256 (RFC 2104) under
//! distinct labels. Nothing is derived from a seed given on a command line.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// HMAC-SHA256 (RFC 2104) over the concatenation of `parts` under `key`, not yet finalized:
/// finalize it for the tag, or verify a received tag against it in constant time.
pub(crate) fn keyed_mac(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256>>::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac
}

/// HMAC-SHA256 of the concatenation of `parts` under `key`.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    keyed_mac(key, parts).finalize().into_bytes().into()
}

/// 32 random bytes agreed by the device and the trunk when a keyed session opens.
///
/// Its `Debug` output hides the bytes, so it never ends up in a log.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionSecret([u8; 32]);

impl std::fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSecret(..)")
    }
}

impl SessionSecret {
    /// A fresh secret from the operating system's entropy (through the thread's CSPRNG).
    pub fn generate() -> Self {
        Self(rand::random())
    }

    /// A secret from known bytes: the trunk's copy, received in the session handshake.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The secret's bytes, to send inside the encrypted channel.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A key for one purpose: HMAC of `label` under the secret.
    pub(crate) fn key(&self, label: &str) -> [u8; 32] {
        hmac_sha256(&self.0, &[b"lsplit/", label.as_bytes()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2 of RFC 4231.
        assert_eq!(
            hex(&hmac_sha256(
                b"Jefe",
                &[b"what do ya want ", b"for nothing?"]
            )),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                &[b"Test Using Larger Than Block-Size Key - Hash Key First"]
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn secrets_are_fresh_and_keys_differ_by_label() {
        let a = SessionSecret::generate();
        assert_ne!(a, SessionSecret::generate());
        assert_ne!(a.key("draw"), a.key("tag"));
        assert_eq!(
            a.key("draw"),
            SessionSecret::from_bytes(*a.as_bytes()).key("draw")
        );
        assert_eq!(format!("{a:?}"), "SessionSecret(..)");
    }
}
