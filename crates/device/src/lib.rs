//! The device side's wiring, shared by `lsplit generate`, `lsplit image` and `lsplit edge`.
//!
//! A [`Device`] holds the device's share of a language model (tokenizer, head and tail) and
//! where its trunk sessions come from ([`TrunkSource`]: in-process or a trunk server whose
//! fingerprint matched this device's copy of the same layers). [`Device::session`] gives every
//! generation fresh [`SessionKeys`], so no two sessions share draws, tags or permutation.
//! [`DiffusionTrunks`] does the same for the trunk of a split diffusion UNet.
//!
//! ```no_run
//! # fn main() -> Result<(), lsplit_device::DeviceError> {
//! use lsplit_device::{Device, DeviceOptions, PolicyChoice};
//! # let (source, tokenizer, path) = todo!();
//! let device = Device::load(DeviceOptions {
//!     path,
//!     source,
//!     tokenizer,
//!     split: Some(lsplit_model::SplitPlan::symmetric(2, 30)?),
//!     cloud: Vec::new(),
//!     trunk_adapter: None,
//!     policy: PolicyChoice::Fixed,
//!     obfuscation: lsplit_split::Obfuscation::None,
//!     codec: lsplit_wire::Codec::F32,
//! })?;
//! let mut session = device.session()?;
//! # Ok(()) }
//! ```

mod diffusion;
mod error;
mod trunks;

pub use diffusion::{DiffusionTrunkChoice, DiffusionTrunks};
pub use error::DeviceError;
pub use trunks::{Cloud, OpenTrunk, TrunkSource};

use std::path::PathBuf;
use std::sync::Arc;

use lsplit_model::{ModelSource, PartKind, PartSpec, SplitPlan};
use lsplit_remote::RemoteOptions;
use lsplit_split::{DeviceModel, Obfuscation, Session, SessionKeys, SplitPolicy, Trunk};
use lsplit_tokenizer::Tokenizer;
use lsplit_wire::Codec;

/// How the split points of each step are chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyChoice {
    /// The split's own points at every step.
    Fixed,
    /// Points drawn afresh at every step from these lists, as users write them (`1,2,3,4`).
    Random {
        /// Layers K1 is drawn from.
        k1: String,
        /// Layers K2 is drawn from.
        k2: String,
    },
}

/// What to load and where the trunk runs.
pub struct DeviceOptions {
    /// The model file or directory (for people and for the API's model name).
    pub path: PathBuf,
    /// The opened model.
    pub source: ModelSource,
    /// Its tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The split, or `None` for the unsplit baseline; a trunk server's split replaces it.
    pub split: Option<SplitPlan>,
    /// The trunk server to run the trunk on instead of in this process, or several servers
    /// that divide the trunk's layers, in layer order; empty for in-process.
    pub cloud: Vec<RemoteOptions>,
    /// The public LoRA adapter the trunk server applies to its own layers (`lsplit serve
    /// --adapter`): the device holds it only to check the server's fingerprint, never applies it.
    pub trunk_adapter: Option<PathBuf>,
    /// How each step's split points are chosen.
    pub policy: PolicyChoice,
    /// How rows are disguised on the wire.
    pub obfuscation: Obfuscation,
    /// How hidden rows are encoded on the wire.
    pub codec: Codec,
}

/// The loaded device side: head and tail (or the whole model) and its trunk source.
#[derive(Debug)]
pub struct Device {
    /// The model file or directory.
    pub path: PathBuf,
    /// Tokenizer, head and tail.
    pub model: DeviceModel,
    /// Where trunk sessions come from; `None` for the unsplit baseline.
    trunks: Option<TrunkSource>,
    /// How sessions disguise rows on the wire.
    obfuscation: Obfuscation,
}

impl Device {
    /// A device over an already loaded `model` whose trunk sessions come from `trunks` (`None`
    /// for the unsplit baseline).
    pub fn new(
        path: PathBuf,
        model: DeviceModel,
        trunks: Option<TrunkSource>,
        obfuscation: Obfuscation,
    ) -> Self {
        Self {
            path,
            model,
            trunks,
            obfuscation,
        }
    }

    /// Loads the device's parts for the requested split, or for the split a trunk server runs
    /// (the server is connected to and its fingerprint checked first).
    pub fn load(options: DeviceOptions) -> Result<Self, DeviceError> {
        let DeviceOptions {
            path,
            source,
            tokenizer,
            split,
            cloud,
            trunk_adapter,
            policy,
            obfuscation,
            codec,
        } = options;
        let device = candle_core::Device::Cpu;
        let layers = source.config().num_layers;
        let cloud = if !cloud.is_empty() {
            let hops = cloud
                .into_iter()
                .map(|remote| RemoteOptions {
                    codecs: vec![codec],
                    ..remote
                })
                .collect();
            Some(TrunkSource::connect(
                hops,
                &source,
                trunk_adapter.as_deref(),
            )?)
        } else if trunk_adapter.is_some() {
            return Err(DeviceError::Config(
                "--trunk-adapter names a trunk server's adapter: it needs --cloud".into(),
            ));
        } else {
            None
        };
        let plan = match &cloud {
            Some((_, plan)) => Some(*plan),
            None => split,
        };
        let policy = match (policy, plan, obfuscation) {
            (PolicyChoice::Random { .. }, None, _) => {
                return Err(DeviceError::Config(
                    "--split-policy random needs a split".into(),
                ));
            }
            (PolicyChoice::Random { k1, k2 }, Some(_), _) => {
                Some(SplitPolicy::parse(&k1, &k2, layers)?)
            }
            (PolicyChoice::Fixed, Some(plan), _) => Some(SplitPolicy::fixed(plan)),
            (PolicyChoice::Fixed, None, Obfuscation::None) => None,
            (PolicyChoice::Fixed, None, _) => {
                return Err(DeviceError::Config("--obfuscate needs a split".into()));
            }
        };
        let (model, trunks) = match policy {
            None => (DeviceModel::unsplit(&source, tokenizer, &device)?, None),
            Some(policy) => {
                let spec = PartSpec {
                    kind: PartKind::Trunk,
                    layers: policy.trunk_layers(),
                };
                let model = DeviceModel::split(&source, policy.clone(), tokenizer, codec, &device)?;
                let trunks = match cloud {
                    Some((TrunkSource::Cloud(cloud), _)) => {
                        cloud.check(&SessionKeys::fresh(policy.clone(), obfuscation))?;
                        TrunkSource::Cloud(cloud)
                    }
                    Some((cloud, _)) => cloud,
                    None => TrunkSource::Local(Arc::new(source.load_part(&spec, &device)?)),
                };
                (model, Some(trunks))
            }
        };
        let device = Self::new(path, model, trunks, obfuscation);
        tracing::info!(split = %device.describe(), codec = %device.model.codec(), "model loaded");
        Ok(device)
    }

    /// The split for people: the plan of a fixed split, the policy and obfuscation of a random
    /// or obfuscated one, or none.
    pub fn describe(&self) -> String {
        match (self.model.plan(), self.model.policy(), self.obfuscation) {
            (Some(plan), _, Obfuscation::None) => plan.to_string(),
            (_, Some(policy), obfuscation) => format!("{policy}, obfuscation {obfuscation}"),
            (_, None, _) => "none (whole model in one part)".to_string(),
        }
    }

    /// Where the trunk runs, for people: `in-process`, the servers' URLs, or `none (unsplit)`.
    pub fn trunk_location(&self) -> String {
        self.trunks
            .as_ref()
            .map_or_else(|| "none (unsplit)".to_string(), TrunkSource::location)
    }

    /// What the trunk computes on (`cpu`, `cuda:0`), when known.
    pub fn trunk_device(&self) -> Option<String> {
        self.trunks.as_ref().and_then(TrunkSource::compute_device)
    }

    /// Starts a generation session with a fresh trunk session: a split model's session gets
    /// fresh keys, so no two sessions share draws, tags or permutation.
    pub fn session(&self) -> Result<Session<'_>, DeviceError> {
        self.session_with(|trunk| trunk)
    }

    /// [`Device::session`], with the trunk session passed through `wrap` first (to observe
    /// what crosses, as the edge's page does).
    pub fn session_with(
        &self,
        wrap: impl FnOnce(Box<dyn Trunk>) -> Box<dyn Trunk>,
    ) -> Result<Session<'_>, DeviceError> {
        let Some(trunks) = &self.trunks else {
            return Ok(self.model.unsplit_session()?);
        };
        let keys = self.model.new_keys(self.obfuscation)?;
        Ok(self.model.session(wrap(trunks.open(&keys)?), &keys)?)
    }
}
