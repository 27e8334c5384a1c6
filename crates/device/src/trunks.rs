//! Where a language model's trunk sessions are opened: in this process, or on a trunk server.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use lsplit_model::{Adapter, ComputeDevice, ModelPart, ModelSource, SplitPlan, TrunkFingerprint};
use lsplit_remote::{RemoteOptions, RemoteTrunk};
use lsplit_split::{LocalTrunk, SessionKeys, Trunk, TrunkError};

use crate::DeviceError;

/// Opens a trunk session with the session's keys.
pub type OpenTrunk = Box<dyn Fn(&SessionKeys) -> Result<Box<dyn Trunk>, TrunkError> + Send + Sync>;

/// Where trunk sessions are opened: one per generation.
pub enum TrunkSource {
    /// The trunk's layers, loaded in this process (playing the cloud).
    Local(Arc<ModelPart>),
    /// A trunk server whose fingerprint matched this device's copy of the same layers.
    Cloud(Box<Cloud>),
    /// Any other trunk (another transport, or a trunk observed by a test), opened by `open`.
    Custom {
        /// Where the trunk runs, for people.
        location: String,
        /// Opens one session.
        open: OpenTrunk,
    },
}

impl std::fmt::Debug for TrunkSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(part) => f.debug_tuple("Local").field(part).finish(),
            Self::Cloud(cloud) => f.debug_tuple("Cloud").field(cloud).finish(),
            Self::Custom { location, .. } => f
                .debug_struct("Custom")
                .field("location", location)
                .finish(),
        }
    }
}

/// A trunk server and the trunk it must keep running.
#[derive(Debug)]
pub struct Cloud {
    /// How to reach the server.
    options: RemoteOptions,
    /// The device's fingerprint of the server's layers.
    fingerprint: TrunkFingerprint,
    /// Where the server said its trunk computes (`cpu`, `cuda:0`; empty from older servers).
    trunk_device: String,
    /// The connection made (and checked) to learn the server's split, kept for the first
    /// session, so that a single generation connects once.
    first: Mutex<Option<RemoteTrunk>>,
}

impl TrunkSource {
    /// Connects to the trunk server, learns its split and checks its fingerprint against this
    /// device's copy of the model, with the public `adapter` the server applies to its layers
    /// when it has one.
    pub(crate) fn connect(
        options: RemoteOptions,
        source: &ModelSource,
        adapter: Option<&Path>,
    ) -> Result<(Self, SplitPlan), DeviceError> {
        let remote = RemoteTrunk::connect(options.clone())?;
        let server = &remote.info().fingerprint;
        let plan = SplitPlan::new(
            server.layers.start,
            server.layers.end,
            source.config().num_layers,
        )
        .map_err(|e| {
            DeviceError::context(
                format!("the server's trunk ({server}) does not fit this model"),
                e,
            )
        })?;
        let mut fingerprint = TrunkFingerprint::compute(source, server.layers.clone())?;
        if let Some(dir) = adapter {
            let adapter = Adapter::open(dir, source.config(), source.format())?;
            fingerprint = fingerprint.with_adapter(&adapter)?;
        }
        remote.verify(&fingerprint)?;
        let trunk_device = remote.info().limits.trunk_device.clone();
        let cloud = Cloud {
            options,
            fingerprint,
            trunk_device,
            first: Mutex::new(Some(remote)),
        };
        Ok((Self::Cloud(Box::new(cloud)), plan))
    }

    /// Opens a new trunk session with the session's `keys` (a server receives them inside TLS
    /// when the session opens); a server is connected to and checked again, except for the
    /// first session, which takes the connection made to learn the split.
    pub fn open(&self, keys: &SessionKeys) -> Result<Box<dyn Trunk>, TrunkError> {
        match self {
            Self::Local(part) => Ok(Box::new(LocalTrunk::new(Arc::clone(part), keys)?)),
            Self::Cloud(cloud) => Ok(Box::new(cloud.connect()?.with_keys(keys.clone()))),
            Self::Custom { open, .. } => open(keys),
        }
    }

    /// Where the trunk runs, for people: `in-process` or the server's URL.
    pub fn location(&self) -> String {
        match self {
            Self::Local(_) => "in-process".to_string(),
            Self::Cloud(cloud) => cloud.options.url.clone(),
            Self::Custom { location, .. } => location.clone(),
        }
    }

    /// What the trunk computes on (`cpu`, `cuda:0`), when known: a local part's device, or
    /// what the server's handshake said.
    pub fn compute_device(&self) -> Option<String> {
        match self {
            Self::Local(part) => Some(ComputeDevice::of(part.device()).to_string()),
            Self::Cloud(cloud) => Some(cloud.trunk_device.clone()).filter(|d| !d.is_empty()),
            Self::Custom { .. } => None,
        }
    }
}

impl Cloud {
    /// The first connection, or a new one checked to still run the same layers.
    fn connect(&self) -> Result<RemoteTrunk, TrunkError> {
        let first = self
            .first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(remote) = first {
            return Ok(remote);
        }
        let remote = RemoteTrunk::connect(self.options.clone())?;
        remote.verify(&self.fingerprint)?;
        Ok(remote)
    }
}
