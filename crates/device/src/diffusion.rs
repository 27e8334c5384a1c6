//! Where a split diffusion UNet's trunk runs: in-process for a split chosen on the device, or on
//! a diffusion trunk server whose handshake says where the UNet is cut.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::Device;
use lsplit_diffusion::{
    DiffusionError, DiffusionTrunk, LocalDiffusionTrunk, TrunkModel, UnetSplit, load_trunk_model,
};
use lsplit_remote::{CloudFiles, RemoteDiffusionTrunk};
use lsplit_wire::StepCodec;

use crate::DeviceError;

/// Where the user asked the diffusion trunk to run.
#[derive(Debug, Clone)]
pub enum DiffusionTrunkChoice {
    /// In this process, with the UNet cut as given (`none` runs it all on the device).
    Local(UnetSplit),
    /// On this trunk server; the split comes from its handshake.
    Cloud(CloudFiles),
}

/// Opens diffusion trunk sessions, one per image, for a model directory.
pub struct DiffusionTrunks {
    split: UnetSplit,
    source: Source,
}

enum Source {
    /// The UNet is not split: there is no trunk.
    None,
    /// The trunk's weights, loaded here and shared by every image.
    Local {
        model: Arc<TrunkModel>,
        codec: StepCodec,
        device: Device,
    },
    /// A trunk server, checked against the device's copy of the model.
    Cloud {
        files: CloudFiles,
        codec: StepCodec,
        root: PathBuf,
        /// The connection made to learn the split, kept for the first image so that a single
        /// image connects once (boxed: a client is far larger than the other variants).
        first: Box<Mutex<Option<RemoteDiffusionTrunk>>>,
    },
}

impl DiffusionTrunks {
    /// Loads the trunk of the model in `dir` for `choice`; a server is connected to and its
    /// fingerprint checked against `dir` before anything else is loaded.
    pub fn load(
        dir: &Path,
        choice: DiffusionTrunkChoice,
        codec: StepCodec,
        device: &Device,
    ) -> Result<Self, DeviceError> {
        match choice {
            DiffusionTrunkChoice::Cloud(files) => {
                let trunk =
                    RemoteDiffusionTrunk::connect_checked(&files, &[codec], dir).map_err(|e| {
                        DeviceError::context(
                            format!("connecting to the trunk server {}", files.url),
                            e,
                        )
                    })?;
                Ok(Self {
                    split: trunk.split(),
                    source: Source::Cloud {
                        files,
                        codec,
                        root: dir.to_path_buf(),
                        first: Box::new(Mutex::new(Some(trunk))),
                    },
                })
            }
            DiffusionTrunkChoice::Local(UnetSplit::None) => Ok(Self {
                split: UnetSplit::None,
                source: Source::None,
            }),
            DiffusionTrunkChoice::Local(split) => {
                let model = load_trunk_model(dir, split, device).map_err(|e| {
                    DeviceError::context(format!("loading the trunk of {}", dir.display()), e)
                })?;
                Ok(Self {
                    split,
                    source: Source::Local {
                        model: Arc::new(model),
                        codec,
                        device: device.clone(),
                    },
                })
            }
        }
    }

    /// How the UNet is divided.
    pub fn split(&self) -> UnetSplit {
        self.split
    }

    /// Where the trunk runs, for people: `in-process`, the server's URL, or `none (unsplit)`.
    pub fn location(&self) -> String {
        match &self.source {
            Source::None => "none (unsplit)".to_string(),
            Source::Local { .. } => "in-process".to_string(),
            Source::Cloud { files, .. } => files.url.clone(),
        }
    }

    /// Opens the trunk session of one image; `None` when the UNet is not split. A server is
    /// connected to and checked again, except for the first image.
    pub fn open(&self) -> Result<Option<Box<dyn DiffusionTrunk>>, DiffusionError> {
        Ok(match &self.source {
            Source::None => None,
            Source::Local {
                model,
                codec,
                device,
            } => Some(Box::new(LocalDiffusionTrunk::new(
                Arc::clone(model),
                *codec,
                device.clone(),
            ))),
            Source::Cloud {
                files,
                codec,
                root,
                first,
            } => {
                let kept = first.lock().unwrap_or_else(PoisonError::into_inner).take();
                let trunk = match kept {
                    Some(trunk) => trunk,
                    None => RemoteDiffusionTrunk::connect_checked(files, &[*codec], root)
                        .map_err(|e| DiffusionError::Trunk(e.to_string()))?,
                };
                Some(Box::new(trunk))
            }
        })
    }
}
