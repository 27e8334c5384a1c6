//! What a server agrees to with a device, checked the same way for every model kind: the
//! protocol version, a codec from the server's list, and the fingerprint of the trunk it runs.

use std::fmt::Display;

use tonic::Status;

use crate::ServerError;
use crate::session_loop::SessionNames;

/// Most codecs a device may offer in its handshake: every codec there is fits, and a longer
/// list is refused before it is parsed or repeated in a status.
pub(crate) const MAX_OFFERED_CODECS: usize = 32;

/// A model kind's protocol: the version this build speaks, and how statuses name it, its
/// codecs and its sessions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Protocol {
    /// `trunk`, `diffusion`.
    name: &'static str,
    version: u32,
    /// `codec`, `step codec`.
    codec: &'static str,
    /// How its sessions are named.
    pub(crate) sessions: SessionNames,
}

impl Protocol {
    pub(crate) const fn new(
        name: &'static str,
        version: u32,
        codec: &'static str,
        sessions: SessionNames,
    ) -> Self {
        Self {
            name,
            version,
            codec,
            sessions,
        }
    }
}

/// A server's protocol, codecs (of type `C`) and trunk.
#[derive(Debug)]
pub(crate) struct Terms<C> {
    protocol: Protocol,
    codecs: Vec<C>,
    sha256: [u8; 32],
    /// The trunk as statuses name it.
    trunk: String,
}

impl<C: Copy + PartialEq + Display> Terms<C> {
    /// The terms of a server speaking `protocol`, offering `codecs` (at least one) for the
    /// trunk `trunk` whose fingerprint is `sha256`.
    pub(crate) fn new(
        protocol: Protocol,
        codecs: &[C],
        sha256: [u8; 32],
        trunk: &dyn Display,
    ) -> Result<Self, ServerError> {
        if codecs.is_empty() {
            return Err(ServerError::Config(format!(
                "the server must offer a {}",
                protocol.codec
            )));
        }
        Ok(Self {
            protocol,
            codecs: codecs.to_vec(),
            sha256,
            trunk: trunk.to_string(),
        })
    }

    /// The codecs this server serves.
    pub(crate) fn codecs(&self) -> &[C] {
        &self.codecs
    }

    /// The protocol version this server speaks.
    pub(crate) fn version(&self) -> u32 {
        self.protocol.version
    }

    /// The handshake: the device's `version` must be ours; the first of its `offered` codec
    /// values (at most [`MAX_OFFERED_CODECS`]) that names a codec, with `parse`, this server
    /// serves is chosen.
    pub(crate) fn agree<R: Copy>(
        &self,
        version: u32,
        offered: &[R],
        parse: impl Fn(R) -> Option<C>,
    ) -> Result<C, Status> {
        self.check_version(version)?;
        if offered.len() > MAX_OFFERED_CODECS {
            return Err(Status::invalid_argument(format!(
                "the device offers {} {} values; at most {MAX_OFFERED_CODECS} are accepted",
                offered.len(),
                self.protocol.codec
            )));
        }
        let offered: Vec<C> = offered.iter().filter_map(|&c| parse(c)).collect();
        offered
            .iter()
            .copied()
            .find(|c| self.codecs.contains(c))
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "no {} in common: the device offers [{}], this server serves [{}]",
                    self.protocol.codec,
                    names(&offered),
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
                self.protocol.codec,
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
        let Protocol {
            name,
            version: ours,
            ..
        } = self.protocol;
        if version == ours {
            Ok(())
        } else {
            Err(Status::failed_precondition(format!(
                "the device speaks {name} protocol version {version} but this server speaks \
                 version {ours}"
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
