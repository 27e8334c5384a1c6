//! What a server agrees to with a device, checked the same way for every model kind: the
//! protocol version, a codec from the server's list, and the fingerprint of the trunk it runs.

use std::fmt::Display;

use tonic::Status;

use crate::ServerError;

/// A server's protocol version, codecs (of type `C`) and trunk.
#[derive(Debug)]
pub(crate) struct Terms<C> {
    /// The protocol's name in statuses: `trunk`, `diffusion`.
    protocol: &'static str,
    version: u32,
    /// What a codec is called in statuses: `codec`, `step codec`.
    codec_noun: &'static str,
    codecs: Vec<C>,
    sha256: [u8; 32],
    /// The trunk as statuses name it.
    trunk: String,
}

impl<C: Copy + PartialEq + Display> Terms<C> {
    /// The terms of a server speaking `protocol` at `version`, offering `codecs` (at least
    /// one) for the trunk `trunk` whose fingerprint is `sha256`.
    pub(crate) fn new(
        protocol: &'static str,
        version: u32,
        codec_noun: &'static str,
        codecs: Vec<C>,
        sha256: [u8; 32],
        trunk: &dyn Display,
    ) -> Result<Self, ServerError> {
        if codecs.is_empty() {
            return Err(ServerError::Config(format!(
                "the server must offer a {codec_noun}"
            )));
        }
        Ok(Self {
            protocol,
            version,
            codec_noun,
            codecs,
            sha256,
            trunk: trunk.to_string(),
        })
    }

    /// The protocol version this server speaks.
    pub(crate) fn version(&self) -> u32 {
        self.version
    }

    /// The handshake: the device's `version` must be ours; the first of its `offered` codecs
    /// that this server serves is chosen.
    pub(crate) fn agree(&self, version: u32, offered: &[C]) -> Result<C, Status> {
        self.check_version(version)?;
        offered
            .iter()
            .copied()
            .find(|c| self.codecs.contains(c))
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "no {} in common: the device offers [{}], this server serves [{}]",
                    self.codec_noun,
                    names(offered),
                    names(&self.codecs)
                ))
            })
    }

    /// A session's opening message: our `version`, a served `codec` (`Err` holds why the
    /// device's codec value names none), and our trunk's fingerprint `sha256`.
    pub(crate) fn open(
        &self,
        version: u32,
        codec: Result<C, String>,
        sha256: &[u8],
    ) -> Result<C, Status> {
        self.check_version(version)?;
        let codec = codec.map_err(Status::invalid_argument)?;
        if !self.codecs.contains(&codec) {
            return Err(Status::failed_precondition(format!(
                "{} {codec} is not served here (this server serves [{}])",
                self.codec_noun,
                names(&self.codecs)
            )));
        }
        if sha256 != self.sha256 {
            let theirs: String = sha256.iter().take(8).map(|b| format!("{b:02x}")).collect();
            return Err(Status::failed_precondition(format!(
                "the device expects the trunk with sha256 {theirs} but this server runs {}",
                self.trunk
            )));
        }
        Ok(codec)
    }

    fn check_version(&self, version: u32) -> Result<(), Status> {
        if version == self.version {
            Ok(())
        } else {
            Err(Status::failed_precondition(format!(
                "the device speaks {} protocol version {version} but this server speaks version \
                 {}",
                self.protocol, self.version
            )))
        }
    }
}

/// Codec names, comma-separated.
fn names<C: Display>(codecs: &[C]) -> String {
    codecs
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
