//! Where a language model's trunk sessions are opened: in this process, on a trunk server, or
//! on several servers that divide the trunk's layers.

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use lsplit_model::{Adapter, ComputeDevice, ModelPart, ModelSource, SplitPlan, TrunkFingerprint};
use lsplit_remote::{RemoteOptions, RemoteTrunk};
use lsplit_split::{DividedTrunk, Hop, LocalTrunk, SessionKeys, Trunk, TrunkError};

use crate::DeviceError;

/// Opens a trunk session with the session's keys.
pub type OpenTrunk = Box<dyn Fn(&SessionKeys) -> Result<Box<dyn Trunk>, TrunkError> + Send + Sync>;

/// Where trunk sessions are opened: one per generation.
pub enum TrunkSource {
    /// The trunk's layers, loaded in this process (playing the cloud).
    Local(Arc<ModelPart>),
    /// Trunk servers whose fingerprints matched this device's copy of the same layers.
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

/// The trunk servers of a session, in layer order: one, or several that divide the trunk.
#[derive(Debug)]
pub struct Cloud {
    hops: Vec<CloudHop>,
}

/// One trunk server and the layers it must keep running.
#[derive(Debug)]
struct CloudHop {
    /// How to reach the server.
    options: RemoteOptions,
    /// The device's fingerprint of the server's layers.
    fingerprint: TrunkFingerprint,
    /// Where the server said its trunk computes (`cpu`, `cuda:0`; empty from older servers).
    trunk_device: String,
    /// The connection made (and checked) to learn the server's layers, kept for the first
    /// session, so that a single generation connects once.
    first: Mutex<Option<RemoteTrunk>>,
}

impl TrunkSource {
    /// Connects to each trunk server of `hops` (one, or several dividing the trunk in layer
    /// order), learns its layers and checks its fingerprint against this device's copy of the
    /// model, with the public `adapter` the servers apply to their layers when they have one.
    /// The split is the first server's first layer to the last one's end.
    pub(crate) fn connect(
        hops: Vec<RemoteOptions>,
        source: &ModelSource,
        adapter: Option<&Path>,
    ) -> Result<(Self, SplitPlan), DeviceError> {
        let adapter = match adapter {
            Some(dir) => Some(Adapter::open(dir, source.config(), source.format())?),
            None => None,
        };
        let mut checked: Vec<CloudHop> = Vec::with_capacity(hops.len());
        for options in hops {
            let remote = RemoteTrunk::connect(options.clone())?;
            let layers = remote.info().fingerprint.layers.clone();
            let gap = checked
                .last()
                .filter(|before| before.fingerprint.layers.end != layers.start);
            if let Some(before) = gap {
                return Err(DeviceError::Config(format!(
                    "the servers of --cloud must run consecutive layers, in order: {} runs \
                     {:?} and {} runs {layers:?}",
                    before.options.url, before.fingerprint.layers, options.url
                )));
            }
            let mut fingerprint = TrunkFingerprint::compute(source, layers)?;
            if let Some(adapter) = &adapter {
                fingerprint = fingerprint.with_adapter(adapter)?;
            }
            remote.verify(&fingerprint)?;
            checked.push(CloudHop {
                options,
                fingerprint,
                trunk_device: remote.info().limits.trunk_device.clone(),
                first: Mutex::new(Some(remote)),
            });
        }
        let (Some(first), Some(last)) = (checked.first(), checked.last()) else {
            return Err(DeviceError::Config("--cloud names no server".into()));
        };
        let (k1, k2) = (first.fingerprint.layers.start, last.fingerprint.layers.end);
        let plan = SplitPlan::new(k1, k2, source.config().num_layers).map_err(|e| {
            DeviceError::context(
                format!("the servers' trunk (layers {k1}..{k2}) does not fit this model"),
                e,
            )
        })?;
        Ok((Self::Cloud(Box::new(Cloud { hops: checked })), plan))
    }

    /// Opens a new trunk session with the session's `keys` (a server receives them inside TLS
    /// when the session opens); a server is connected to and checked again, except for the
    /// first session, which takes the connection made to learn the split. A divided trunk
    /// opens one session per server, with [`SessionKeys::for_hop`].
    pub fn open(&self, keys: &SessionKeys) -> Result<Box<dyn Trunk>, TrunkError> {
        match self {
            Self::Local(part) => Ok(Box::new(LocalTrunk::new(Arc::clone(part), keys)?)),
            Self::Cloud(cloud) => cloud.open(keys),
            Self::Custom { open, .. } => open(keys),
        }
    }

    /// Where the trunk runs, for people: `in-process` or the servers' URLs, in layer order.
    pub fn location(&self) -> String {
        match self {
            Self::Local(_) => "in-process".to_string(),
            Self::Cloud(cloud) => cloud
                .hops
                .iter()
                .map(|hop| hop.options.url.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            Self::Custom { location, .. } => location.clone(),
        }
    }

    /// What the trunk computes on (`cpu`, `cuda:0`), when known: a local part's device, or
    /// what each server's handshake said (in layer order).
    pub fn compute_device(&self) -> Option<String> {
        match self {
            Self::Local(part) => Some(ComputeDevice::of(part.device()).to_string()),
            Self::Cloud(cloud) => {
                let devices: Vec<&str> = cloud
                    .hops
                    .iter()
                    .map(|hop| hop.trunk_device.as_str())
                    .filter(|d| !d.is_empty())
                    .collect();
                Some(devices.join(", ")).filter(|d| !d.is_empty())
            }
            Self::Custom { .. } => None,
        }
    }
}

impl Cloud {
    /// Checks that a session of `keys` can run on these servers (a divided trunk serves only
    /// split points inside its first and last servers' layers).
    pub(crate) fn check(&self, keys: &SessionKeys) -> Result<(), TrunkError> {
        if self.hops.len() > 1 {
            for (index, hop) in self.hops.iter().enumerate() {
                keys.for_hop(hop.layers(), index == 0, index + 1 == self.hops.len())?;
            }
        }
        Ok(())
    }

    /// A session of `keys`: on the one server, or one per server relayed by the device.
    fn open(&self, keys: &SessionKeys) -> Result<Box<dyn Trunk>, TrunkError> {
        if let [hop] = self.hops.as_slice() {
            return Ok(Box::new(hop.connect()?.with_keys(keys.clone())));
        }
        let last = self.hops.len() - 1;
        let hops = self
            .hops
            .iter()
            .enumerate()
            .map(|(index, hop)| {
                let keys = keys.for_hop(hop.layers(), index == 0, index == last)?;
                let trunk = Box::new(hop.connect()?.with_keys(keys.clone()));
                Ok(Hop { trunk, keys })
            })
            .collect::<Result<_, TrunkError>>()?;
        Ok(Box::new(DividedTrunk::new(keys.clone(), hops)?))
    }
}

impl CloudHop {
    /// The layers this server runs.
    fn layers(&self) -> Range<usize> {
        self.fingerprint.layers.clone()
    }

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
