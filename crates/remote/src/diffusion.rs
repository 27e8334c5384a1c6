//! The device's side of a remote diffusion trunk: [`RemoteDiffusionTrunk`] implements
//! [`DiffusionTrunk`] over the protocol of `lsplit_proto::diffusion`, on the same reconnecting
//! [`Link`] as [`crate::RemoteTrunk`].
//!
//! Connecting performs the handshake, which tells the device the split the server serves, the
//! fingerprint of its trunk and the step codec; [`RemoteDiffusionTrunk::verify_model`] checks
//! that fingerprint against the device's own copy of the model. Each image is one stream,
//! opened by the image's setup. If the connection drops mid-image, the next call reconnects,
//! sends the setup again (the trunk holds nothing else) and retries the step.

use std::path::Path;

use lsplit_diffusion::{
    DiffusionError, DiffusionTrunk, ImageSetup, StepRequest, TrunkFingerprint, UnetSplit,
    trunk_fingerprint,
};
use lsplit_proto::diffusion::pb::image_reply::Kind as ReplyKind;
use lsplit_proto::diffusion::pb::image_request::Kind as RequestKind;
use lsplit_proto::diffusion::pb::{self, ImageReply, ImageRequest};
use lsplit_proto::diffusion::{DIFFUSION_PROTOCOL_VERSION, tensor_to_pb, tensors_from_pb};
use lsplit_wire::{StepCodec, StepTensor};

use crate::link::{Announced, Link, Offering, Protocol, ServerTerms, Wire};
use crate::{CloudFiles, RemoteError, RemoteOptions};

impl Announced for pb::Limits {
    /// A diffusion trunk keeps no cache: nothing of its limits binds an image.
    fn binding(&self) -> Option<String> {
        None
    }

    fn max_message_bytes(&self) -> u64 {
        self.max_message_bytes
    }
}

/// What the diffusion handshake told the device: the trunk with its split, the step codec of
/// every tensor both ways, and the server's limits.
pub type DiffusionServerInfo = ServerTerms<TrunkFingerprint, StepCodec, pb::Limits>;

impl Protocol for Offering<StepCodec> {
    type Service = pb::DiffusionTrunk;
    type Terms = DiffusionServerInfo;
    const WIRE: Wire = Wire::new("diffusion", DIFFUSION_PROTOCOL_VERSION);

    fn hello(&self) -> pb::HandshakeRequest {
        let codecs = self.codecs.iter().map(|c| u32::from(c.id()));
        pb::HandshakeRequest {
            protocol_version: DIFFUSION_PROTOCOL_VERSION,
            codecs: codecs.collect(),
        }
    }

    fn agreed(
        &self,
        welcome: pb::HandshakeReply,
        tls: Option<String>,
    ) -> Result<DiffusionServerInfo, RemoteError> {
        let fingerprint = welcome
            .fingerprint
            .ok_or_else(|| RemoteError::Protocol("the fingerprint field is missing".into()))?;
        let split: UnetSplit = fingerprint
            .split
            .parse()
            .map_err(|e| RemoteError::Protocol(format!("the server's split: {e}")))?;
        if split == UnetSplit::None {
            return Err(RemoteError::Protocol(
                "the server announces split none, which has no trunk".into(),
            ));
        }
        let sha256 = <[u8; 32]>::try_from(fingerprint.sha256.as_slice()).map_err(|_| {
            RemoteError::Protocol(format!(
                "the fingerprint's sha256 is {} bytes, not 32",
                fingerprint.sha256.len()
            ))
        })?;
        let codec = u8::try_from(welcome.codec)
            .ok()
            .and_then(|id| StepCodec::from_id(id).ok())
            .filter(|codec| self.codecs.contains(codec))
            .ok_or_else(|| {
                RemoteError::Protocol(format!(
                    "the server chose step codec id {}, which this device did not offer",
                    welcome.codec
                ))
            })?;
        let fingerprint = TrunkFingerprint { split, sha256 };
        ServerTerms::new(fingerprint, codec, welcome.limits, tls)
    }

    fn session_id(reply: &ImageReply) -> Option<u64> {
        match &reply.kind {
            Some(ReplyKind::Ready(ready)) => Some(ready.session_id),
            _ => None,
        }
    }

    /// Nothing is replayed: a new stream needs only the image's setup.
    fn answers(_: &ImageRequest, _: &ImageReply) -> bool {
        false
    }
}

/// A diffusion trunk running on a server.
#[derive(Debug)]
pub struct RemoteDiffusionTrunk {
    link: Link<Offering<StepCodec>>,
}

impl RemoteDiffusionTrunk {
    /// Connects with `options` (address, TLS, token, timeouts and retry bound; its hidden-row
    /// `codecs` do not apply) and performs the handshake, offering the step `codecs`, most
    /// preferred first. Opens no image yet and checks no fingerprint: see [`Self::verify_model`].
    pub fn connect(options: RemoteOptions, codecs: &[StepCodec]) -> Result<Self, RemoteError> {
        if codecs.is_empty() {
            return Err(RemoteError::Config(
                "offer the server at least one step codec".into(),
            ));
        }
        let protocol = Offering {
            codecs: codecs.to_vec(),
        };
        Ok(Self {
            link: Link::connect(options, protocol)?,
        })
    }

    /// Connects as the command line says, offering `codecs`, and checks the server's trunk
    /// against the model at `model_root`: what `lsplit image --cloud` needs in one call.
    pub fn connect_checked(
        files: &CloudFiles,
        codecs: &[StepCodec],
        model_root: &Path,
    ) -> Result<Self, RemoteError> {
        let trunk = Self::connect(files.options()?, codecs)?;
        trunk.verify_model(model_root)?;
        Ok(trunk)
    }

    /// What the handshake told: fingerprint (with the split), codec and limits.
    pub fn info(&self) -> &DiffusionServerInfo {
        self.link.terms()
    }

    /// The split the server serves; the device runs the matching ends.
    pub fn split(&self) -> UnetSplit {
        self.info().fingerprint.split
    }

    /// The step codec agreed for every tensor.
    pub fn codec(&self) -> StepCodec {
        self.info().codec
    }

    /// Refuses a server whose trunk differs from `local`, the device's fingerprint of the same
    /// split of its own model.
    pub fn verify(&self, local: &TrunkFingerprint) -> Result<(), RemoteError> {
        let server = self.info().fingerprint;
        if *local == server {
            Ok(())
        } else {
            Err(RemoteError::DiffusionFingerprintMismatch {
                server,
                local: *local,
            })
        }
    }

    /// Fingerprints the server's split of the model at `root` and [`Self::verify`]s it.
    pub fn verify_model(&self, root: &Path) -> Result<(), RemoteError> {
        let local = trunk_fingerprint(root, self.split()).map_err(|e| {
            RemoteError::Config(format!(
                "fingerprinting this device's copy of the model for the server's split {}: {e}",
                self.split()
            ))
        })?;
        self.verify(&local)
    }
}

impl From<RemoteError> for DiffusionError {
    fn from(error: RemoteError) -> Self {
        DiffusionError::Trunk(error.to_string())
    }
}

impl DiffusionTrunk for RemoteDiffusionTrunk {
    fn begin_image(&mut self, setup: ImageSetup) -> Result<(), DiffusionError> {
        let info = self.info();
        let setup = pb::Setup {
            protocol_version: DIFFUSION_PROTOCOL_VERSION,
            codec: u32::from(info.codec.id()),
            fingerprint_sha256: info.fingerprint.sha256.to_vec(),
            conditioning: setup.conditioning.iter().map(tensor_to_pb).collect(),
            guidance: setup.guidance,
        };
        self.link.begin(ImageRequest {
            kind: Some(RequestKind::Setup(setup)),
        });
        Ok(self.link.open()?)
    }

    fn step(&mut self, request: StepRequest) -> Result<Vec<StepTensor>, DiffusionError> {
        if !self.link.begun() {
            return Err(DiffusionError::Request(
                "a step before the image's conditioning was sent".into(),
            ));
        }
        let step = ImageRequest {
            kind: Some(RequestKind::Step(pb::Step {
                inputs: request.inputs.iter().map(tensor_to_pb).collect(),
                timestep: request.timestep,
            })),
        };
        match self.link.call(step, false)?.kind {
            Some(ReplyKind::Output(output)) => {
                Ok(tensors_from_pb(output.outputs, self.codec(), u64::MAX)
                    .map_err(|e| RemoteError::Protocol(e.to_string()))?)
            }
            _ => Err(
                RemoteError::Protocol("the server answered a step without its output".into())
                    .into(),
            ),
        }
    }
}
