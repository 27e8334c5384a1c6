//! A diffusers-format model directory: `model_index.json` says which pipeline it is and each
//! component (unet/, vae/, text_encoder/, ...) has its own `config.json` and safetensors weights.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::error::DiffusionError;

/// Which Stable Diffusion pipeline a directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `StableDiffusionPipeline`: SD 1.x and 2.x, one CLIP text encoder.
    StableDiffusion,
    /// `StableDiffusionXLPipeline`: two text encoders, pooled text embedding and time ids.
    StableDiffusionXl,
}

/// The pipeline-level facts read from `model_index.json`.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The directory itself.
    pub root: PathBuf,
    /// SD 1.x/2.x or SDXL.
    pub family: Family,
    /// SDXL: an empty negative prompt means zero embeddings instead of encoding "".
    pub force_zeros_for_empty_prompt: bool,
}

impl ModelDir {
    /// Reads `model_index.json` and checks that every component the family needs is present.
    pub fn open(root: &Path) -> Result<Self, DiffusionError> {
        if !root.is_dir() {
            return Err(DiffusionError::ModelDir(format!(
                "{} is not a directory (expected a diffusers-format model directory)",
                root.display()
            )));
        }
        let index: serde_json::Value = read_json(&root.join("model_index.json"))?;
        let class = index
            .get("_class_name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                DiffusionError::ModelDir(format!(
                    "{}: no \"_class_name\" string",
                    root.join("model_index.json").display()
                ))
            })?;
        let family = match class {
            "StableDiffusionPipeline" => Family::StableDiffusion,
            "StableDiffusionXLPipeline" => Family::StableDiffusionXl,
            other => {
                return Err(DiffusionError::ModelDir(format!(
                    "pipeline {other} is not supported (supported: StableDiffusionPipeline, \
                     StableDiffusionXLPipeline)"
                )));
            }
        };
        let force_zeros_for_empty_prompt = index
            .get("force_zeros_for_empty_prompt")
            .and_then(|v| v.as_bool())
            .unwrap_or(family == Family::StableDiffusionXl);
        let dir = Self {
            root: root.to_path_buf(),
            family,
            force_zeros_for_empty_prompt,
        };
        for component in dir.components() {
            let path = root.join(component);
            if !path.is_dir() {
                return Err(DiffusionError::ModelDir(format!(
                    "{}: missing component directory {component}/",
                    root.display()
                )));
            }
        }
        Ok(dir)
    }

    /// The component folders this family needs.
    pub fn components(&self) -> &'static [&'static str] {
        match self.family {
            Family::StableDiffusion => &["unet", "vae", "text_encoder", "tokenizer", "scheduler"],
            Family::StableDiffusionXl => &[
                "unet",
                "vae",
                "text_encoder",
                "text_encoder_2",
                "tokenizer",
                "tokenizer_2",
                "scheduler",
            ],
        }
    }

    /// Parses `COMPONENT/FILE` as JSON into `T`.
    pub fn config<T: DeserializeOwned>(
        &self,
        component: &str,
        file: &str,
    ) -> Result<T, DiffusionError> {
        read_json(&self.root.join(component).join(file))
    }

    /// The safetensors weights of a component: the f32 file, else the `.fp16` variant.
    pub fn weights(&self, component: &str) -> Result<PathBuf, DiffusionError> {
        let dir = self.root.join(component);
        let stem = match component {
            "text_encoder" | "text_encoder_2" => "model",
            _ => "diffusion_pytorch_model",
        };
        for name in [
            format!("{stem}.safetensors"),
            format!("{stem}.fp16.safetensors"),
        ] {
            let path = dir.join(&name);
            if path.is_file() {
                return Ok(path);
            }
        }
        Err(DiffusionError::ModelDir(format!(
            "{}: no {stem}.safetensors (or .fp16.safetensors) weights",
            dir.display()
        )))
    }
}

/// Reads and parses a JSON file, naming the file in every error.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, DiffusionError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| DiffusionError::ModelDir(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| DiffusionError::ModelDir(format!("{}: invalid JSON: {e}", path.display())))
}
