//! The device's share of a model and where its trunk sessions come from, shared by
//! `lsplit generate` and `lsplit edge`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context;
use lsplit_model::{ModelPart, ModelSource, SplitPlan};
use lsplit_model::{PartKind, PartSpec};
use lsplit_proto::TrunkFingerprint;
use lsplit_remote::{RemoteOptions, RemoteTrunk};
use lsplit_split::{
    DeviceModel, LocalTrunk, Obfuscation, Session, SessionKeys, SplitPolicy, Trunk, TrunkError,
};

use crate::args::{ModelArgs, PolicyArgs, SplitArgs, TrunkArgs};

/// Where trunk sessions are opened: one per generation.
#[derive(Debug)]
pub enum TrunkSource {
    /// The trunk's layers, loaded in this process (playing the cloud).
    Local(Arc<ModelPart>),
    /// A trunk server whose fingerprint matched this device's copy of the same layers.
    Cloud(Box<Cloud>),
}

/// A trunk server and the trunk it must keep running.
#[derive(Debug)]
pub struct Cloud {
    /// How to reach the server.
    options: RemoteOptions,
    /// The device's fingerprint of the server's layers.
    fingerprint: TrunkFingerprint,
    /// The connection made (and checked) to learn the server's split, kept for the first
    /// session, so that a single generation connects once.
    first: Mutex<Option<RemoteTrunk>>,
}

impl TrunkSource {
    /// Opens a new trunk session with the session's `keys` (a server receives them inside TLS
    /// when the session opens); a server is connected to and checked again, except for the
    /// first session, which takes the connection made to learn the split.
    pub fn open(&self, keys: &SessionKeys) -> Result<Box<dyn Trunk>, TrunkError> {
        match self {
            Self::Local(part) => Ok(Box::new(LocalTrunk::new(Arc::clone(part), keys)?)),
            Self::Cloud(cloud) => Ok(Box::new(cloud.connect()?.with_keys(keys.clone()))),
        }
    }

    /// Where the trunk runs, for people: `in-process` or the server's URL.
    pub fn location(&self) -> String {
        match self {
            Self::Local(_) => "in-process".to_string(),
            Self::Cloud(cloud) => cloud.options.url.clone(),
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

/// The loaded device side: head and tail (or the whole model) and its trunk source.
#[derive(Debug)]
pub struct Device {
    /// The model file or directory.
    pub path: PathBuf,
    /// Tokenizer, head and tail.
    pub model: DeviceModel,
    /// Where trunk sessions come from; `None` for the unsplit baseline.
    pub trunks: Option<TrunkSource>,
    /// How a keyed model's sessions disguise rows on the wire.
    pub obfuscation: Obfuscation,
}

impl Device {
    /// The split for people: the plan of a fixed split, the policy and obfuscation of a random
    /// or obfuscated one, or none.
    pub fn describe(&self) -> String {
        match (self.model.plan(), self.model.policy(), self.obfuscation) {
            (Some(plan), _, Obfuscation::None) => plan.to_string(),
            (_, Some(policy), obfuscation) => format!("{policy}, obfuscation {obfuscation}"),
            (_, None, _) => "none (whole model in one part)".to_string(),
        }
    }

    /// Starts a generation session with a fresh trunk session: a split model's session gets
    /// fresh keys, so no two sessions share draws, tags or permutation.
    pub fn session(&self) -> anyhow::Result<Session<'_>> {
        let Some(trunks) = &self.trunks else {
            return Ok(self.model.unsplit_session()?);
        };
        let keys = self.model.new_keys(self.obfuscation)?;
        Ok(self.model.session(trunks.open(&keys)?, &keys)?)
    }
}

/// Loads the device's parts for the requested split, or for the split a trunk server runs;
/// with `policy`, for keyed sessions (random split points, obfuscation) when it asks for them.
pub fn load(
    model: &ModelArgs,
    split: &SplitArgs,
    trunk: &TrunkArgs,
    policy: Option<&PolicyArgs>,
) -> anyhow::Result<Device> {
    let path = model.path()?;
    let (source, tokenizer) = model.open()?;
    let device = candle_core::Device::Cpu;
    let cloud = match &trunk.cloud {
        Some(url) => Some(connect_cloud(trunk, url, &source)?),
        None => None,
    };
    let plan = match &cloud {
        Some((_, plan)) => Some(*plan),
        None => split.plan(source.config().num_layers)?,
    };
    let layers = source.config().num_layers;
    let random = match policy {
        Some(args) => args.policy(plan, layers)?,
        None => None,
    };
    let obfuscation = policy.map_or(Obfuscation::None, |args| args.obfuscate);
    let (model, trunks) = match random.or(plan.map(SplitPolicy::fixed)) {
        None => (DeviceModel::unsplit(&source, tokenizer, &device)?, None),
        Some(policy) => {
            let spec = PartSpec {
                kind: PartKind::Trunk,
                layers: policy.trunk_layers(),
            };
            let model = DeviceModel::split(&source, policy, tokenizer, trunk.codec, &device)?;
            let trunks = match cloud {
                Some((cloud, _)) => cloud,
                None => TrunkSource::Local(Arc::new(source.load_part(&spec, &device)?)),
            };
            (model, Some(trunks))
        }
    };
    let device = Device {
        path,
        model,
        trunks,
        obfuscation,
    };
    tracing::info!(split = %device.describe(), codec = %device.model.codec(), "model loaded");
    Ok(device)
}

/// Connects to the trunk server, learns its split and checks its fingerprint against this
/// device's copy of the model.
fn connect_cloud(
    args: &TrunkArgs,
    url: &str,
    source: &ModelSource,
) -> anyhow::Result<(TrunkSource, SplitPlan)> {
    let mut options = args.auth.files(url).options()?;
    options.codecs = vec![args.codec];
    let remote = RemoteTrunk::connect(options.clone())?;
    let server = &remote.info().fingerprint;
    let plan = SplitPlan::new(
        server.layers.start,
        server.layers.end,
        source.config().num_layers,
    )
    .with_context(|| format!("the server's trunk ({server}) does not fit this model"))?;
    let fingerprint = TrunkFingerprint::compute(source, server.layers.clone())?;
    remote.verify(&fingerprint)?;
    Ok((
        TrunkSource::Cloud(Box::new(Cloud {
            options,
            fingerprint,
            first: Mutex::new(Some(remote)),
        })),
        plan,
    ))
}
