//! LoRA adapters (Hu et al., <https://arxiv.org/abs/2106.09685>) in PEFT's format: a
//! directory with `adapter_config.json` and `adapter_model.safetensors`.
//!
//! An adapter adds a low-rank update to some projections of some layers:
//! `y = W x + scale · B (A x)`, with `A (r, in)`, `B (out, r)` and `scale = alpha / r`
//! (`alpha / sqrt(r)` with rsLoRA). The update is applied beside the base weight, never merged
//! into it, so it works over quantized weights too and computes what PEFT's unmerged layers do.
//!
//! A GGUF file stores the query and key weights with the rows of each head permuted for
//! interleaved RoPE (llama.cpp's converter does it); a Hugging Face adapter's `B` of those
//! projections is permuted the same way at load, so that its update lands on the rows it was
//! trained for.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::safetensors::SliceSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::{LlamaConfig, ModelError, ModelFormat, Result};

/// Largest `adapter_config.json` read: PEFT's are about 1 KiB.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Room for the safetensors header beyond the tensors' data.
const HEADER_ALLOWANCE: u64 = 1 << 20;

/// A projection of a decoder layer that an adapter may update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// The attention's query projection (`q_proj`).
    Q,
    /// The key projection (`k_proj`).
    K,
    /// The value projection (`v_proj`).
    V,
    /// The attention's output projection (`o_proj`).
    O,
    /// The feed-forward's gate projection (`gate_proj`).
    Gate,
    /// The feed-forward's up projection (`up_proj`).
    Up,
    /// The feed-forward's down projection (`down_proj`).
    Down,
}

impl Target {
    /// Every target, in a layer's order.
    pub const ALL: [Self; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    /// PEFT's (and transformers') module name.
    pub fn module(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    /// The module's path inside a layer.
    fn path(self) -> String {
        let block = match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            Self::Gate | Self::Up | Self::Down => "mlp",
        };
        format!("{block}.{}", self.module())
    }

    /// PEFT's names and shapes of this projection's `A` and `B` matrices in `layer` at rank
    /// `r` under `c`: what an adapter file holds for it (for tools that write adapters).
    pub fn lora_matrices(
        self,
        layer: usize,
        r: usize,
        c: &LlamaConfig,
    ) -> [(String, [usize; 2]); 2] {
        let (out, inp) = self.widths(c);
        [
            (name(layer, self, Half::A), [r, inp]),
            (name(layer, self, Half::B), [out, r]),
        ]
    }

    /// The projection's `(out, in)` widths under `c`.
    fn widths(self, c: &LlamaConfig) -> (usize, usize) {
        let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        match self {
            Self::Q => (q, c.hidden_size),
            Self::K | Self::V => (kv, c.hidden_size),
            Self::O => (c.hidden_size, q),
            Self::Gate | Self::Up => (c.intermediate_size, c.hidden_size),
            Self::Down => (c.hidden_size, c.intermediate_size),
        }
    }
}

/// One low-rank update of one projection, ready to apply: `A` and `B` transposed, as f32.
#[derive(Debug, Clone)]
pub(crate) struct Lora {
    /// `Aᵀ (in, r)`.
    a_t: Tensor,
    /// `Bᵀ (r, out)`, its columns in the base weight's row order.
    b_t: Tensor,
    scale: f64,
}

impl Lora {
    /// The base projection `y (1, rows, out)` of rows `x (1, rows, in)` plus this update:
    /// `y + ((x Aᵀ) Bᵀ) · scale`, in PEFT's order of operations.
    pub(crate) fn add(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let delta = x.broadcast_matmul(&self.a_t)?.broadcast_matmul(&self.b_t)?;
        Ok((y + (delta * self.scale)?)?)
    }

    /// The scale, then `A` and `B` as applied (row-major f32): what a fingerprint covers.
    pub(crate) fn digest_parts(&self) -> Result<(f64, Vec<f32>, Vec<f32>)> {
        let values = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.t()?.flatten_all()?.to_vec1()?) };
        Ok((self.scale, values(&self.a_t)?, values(&self.b_t)?))
    }
}

/// The updates one layer takes, by target.
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerLora(BTreeMap<Target, Lora>);

impl LayerLora {
    /// The update of `target`, if the adapter has one.
    pub(crate) fn get(&self, target: Target) -> Option<&Lora> {
        self.0.get(&target)
    }
}

/// A LoRA adapter read from a PEFT directory and checked against a model's configuration.
#[derive(Debug)]
pub struct Adapter {
    dir: PathBuf,
    rank: usize,
    alpha: f64,
    rslora: bool,
    targets: Vec<Target>,
    layers: BTreeMap<usize, LayerLora>,
}

/// The fields of `adapter_config.json` that decide what the adapter computes. Unknown fields
/// (PEFT writes many, mostly for training) are ignored; those that would change the
/// computation in ways not implemented here are read so as to refuse them.
#[derive(Deserialize)]
struct PeftConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    target_modules: serde_json::Value,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    rank_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    alpha_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    lora_bias: bool,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
}

impl Adapter {
    /// Reads the adapter in `dir` for a model of configuration `config` stored as `format`:
    /// every tensor must be a LoRA matrix of a targeted module of a transformed layer, of the
    /// shape the model implies, in f32, f16 or bf16, with finite values; every targeted module
    /// of every transformed layer must have both.
    pub fn open(dir: &Path, config: &LlamaConfig, format: ModelFormat) -> Result<Self> {
        let bad = |reason: String| ModelError::Adapter {
            dir: dir.to_path_buf(),
            reason,
        };
        let peft = read_config(dir)?;
        if let Some(kind) = peft.peft_type.as_deref().filter(|&t| t != "LORA") {
            return Err(bad(format!("peft_type is {kind}, not LORA")));
        }
        let refused = [
            ("use_dora", peft.use_dora),
            ("fan_in_fan_out", peft.fan_in_fan_out),
            ("lora_bias", peft.lora_bias),
            (
                "rank_pattern",
                peft.rank_pattern.as_ref().is_some_and(|p| !p.is_empty()),
            ),
            (
                "alpha_pattern",
                peft.alpha_pattern.as_ref().is_some_and(|p| !p.is_empty()),
            ),
            (
                "modules_to_save",
                peft.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()),
            ),
            ("bias", peft.bias.as_deref().is_some_and(|b| b != "none")),
        ];
        if let Some((field, _)) = refused.iter().find(|(_, set)| *set) {
            return Err(bad(format!(
                "`{field}` is set: lambda-split applies plain LoRA updates only"
            )));
        }
        if peft.r == 0 || peft.r > config.hidden_size {
            return Err(bad(format!(
                "rank r = {} is not within 1..={} (the model's hidden size)",
                peft.r, config.hidden_size
            )));
        }
        if !peft.lora_alpha.is_finite() {
            return Err(bad("lora_alpha is not a finite number".into()));
        }
        let targets = targets(&peft.target_modules).map_err(bad)?;
        let layers: BTreeSet<usize> = match &peft.layers_to_transform {
            None | Some(serde_json::Value::Null) => (0..config.num_layers).collect(),
            Some(value) => layer_list(value).map_err(bad)?,
        };
        if let Some(&layer) = layers.iter().find(|&&l| l >= config.num_layers) {
            return Err(bad(format!(
                "layers_to_transform names layer {layer}, but the model has {} layers",
                config.num_layers
            )));
        }
        let scale = lora_scale(peft.lora_alpha, peft.r, peft.use_rslora);

        let limit = layers.len() as u64
            * targets
                .iter()
                .map(|t| {
                    let (out, inp) = t.widths(config);
                    (peft.r * (out + inp) * DType::F32.size_in_bytes()) as u64
                })
                .sum::<u64>()
            + HEADER_ALLOWANCE;
        let bytes = read_bounded(&dir.join("adapter_model.safetensors"), limit)?;
        let file = SliceSafetensors::new(&bytes)
            .map_err(|e| bad(format!("adapter_model.safetensors is unreadable: {e}")))?;

        let mut matrices: BTreeMap<(usize, Target, Half), Tensor> = BTreeMap::new();
        // By name, so that the first problem reported is the same on every run.
        let mut views = file.tensors();
        views.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, view) in views {
            let (layer, target, half) = parse_name(&name)
                .ok_or_else(|| bad(format!("unexpected tensor `{name}`: not a LoRA matrix of q, k, v, o, gate, up or down of a decoder layer")))?;
            if !targets.contains(&target) {
                return Err(bad(format!(
                    "tensor `{name}` is of {}, which target_modules does not name",
                    target.module()
                )));
            }
            if !layers.contains(&layer) {
                return Err(bad(format!(
                    "tensor `{name}` is of layer {layer}, which the adapter does not transform"
                )));
            }
            let (out, inp) = target.widths(config);
            let expected = match half {
                Half::A => vec![peft.r, inp],
                Half::B => vec![out, peft.r],
            };
            if view.shape() != expected.as_slice() {
                return Err(bad(format!(
                    "tensor `{name}` has shape {:?}, expected {expected:?}",
                    view.shape()
                )));
            }
            let dtype = DType::try_from(view.dtype()).ok();
            if !matches!(dtype, Some(DType::F32 | DType::F16 | DType::BF16)) {
                return Err(bad(format!(
                    "tensor `{name}` is of type {:?}; LoRA matrices must be f32, f16 or bf16",
                    view.dtype()
                )));
            }
            let t = file.load(&name, &Device::Cpu)?.to_dtype(DType::F32)?;
            let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
            if values.iter().any(|v| !v.is_finite()) {
                return Err(bad(format!(
                    "tensor `{name}` holds a value that is not finite"
                )));
            }
            matrices.insert((layer, target, half), t);
        }

        let mut updates = BTreeMap::new();
        for &layer in &layers {
            let mut lora = LayerLora::default();
            for &target in &targets {
                let mut take = |half: Half| {
                    matrices.remove(&(layer, target, half)).ok_or_else(|| {
                        bad(format!("tensor `{}` is missing", name(layer, target, half)))
                    })
                };
                let (a, b) = (take(Half::A)?, take(Half::B)?);
                let b = match (format, target) {
                    (ModelFormat::Gguf, Target::Q) => interleave_heads(&b, config.num_heads)?,
                    (ModelFormat::Gguf, Target::K) => interleave_heads(&b, config.num_kv_heads)?,
                    _ => b,
                };
                let update = Lora {
                    a_t: a.t()?.contiguous()?,
                    b_t: b.t()?.contiguous()?,
                    scale,
                };
                lora.0.insert(target, update);
            }
            updates.insert(layer, lora);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            rank: peft.r,
            alpha: peft.lora_alpha,
            rslora: peft.use_rslora,
            targets,
            layers: updates,
        })
    }

    /// The directory it was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The layers it updates, in order.
    pub fn layers(&self) -> Vec<usize> {
        self.layers.keys().copied().collect()
    }

    /// The layers it updates among `range`.
    pub fn layers_in(&self, range: Range<usize>) -> Vec<usize> {
        self.layers.range(range).map(|(&l, _)| l).collect()
    }

    /// What it is, for people: `DIR (LoRA r 4, alpha 8, q_proj, v_proj)`.
    pub fn describe(&self) -> String {
        let modules: Vec<&str> = self.targets.iter().map(|t| t.module()).collect();
        format!(
            "{} (LoRA r {}, alpha {}{}, {})",
            self.dir.display(),
            self.rank,
            self.alpha,
            if self.rslora { ", rsLoRA" } else { "" },
            modules.join(", ")
        )
    }

    /// Refuses an adapter that updates any layer of `trunk`: a device adapter belongs to the
    /// head's and the tail's layers only, and the trunk never gets one.
    pub fn check_off_trunk(&self, trunk: Range<usize>) -> Result<()> {
        let touched = self.layers_in(trunk.clone());
        if touched.is_empty() {
            return Ok(());
        }
        Err(ModelError::AdapterOnTrunk {
            dir: self.dir.clone(),
            layers: touched,
            trunk,
        })
    }

    /// The updates of model layer `layer` (none when the adapter leaves it alone).
    pub(crate) fn layer(&self, layer: usize) -> LayerLora {
        self.layers.get(&layer).cloned().unwrap_or_default()
    }

    /// Every update on the layers of `range`, by layer then target.
    pub(crate) fn updates_in(
        &self,
        range: Range<usize>,
    ) -> impl Iterator<Item = (usize, Target, &Lora)> {
        self.layers
            .range(range)
            .flat_map(|(&l, lora)| lora.0.iter().map(move |(&t, u)| (l, t, u)))
    }
}

/// The factor of a LoRA update: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
pub fn lora_scale(alpha: f64, rank: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

/// What an adapter written by [`write_peft`] is, besides its matrices.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraShape {
    /// The rank `r`.
    pub rank: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// rsLoRA's scale, `alpha / sqrt(r)`.
    pub rslora: bool,
    /// The projections updated, in each of `layers`.
    pub targets: Vec<Target>,
    /// The model layers updated (`layers_to_transform`).
    pub layers: Vec<usize>,
}

/// Writes an adapter in PEFT's format into `dir` (created if needed): `adapter_config.json` and
/// `adapter_model.safetensors` with `matrices`, each `(A (r, in), B (out, r))` by layer and
/// target in the row order of the model's file; for a GGUF model the query and key `B` rows go
/// back to Hugging Face's order, so that Python peft and [`Adapter::open`] both read it.
pub fn write_peft(
    dir: &Path,
    shape: &LoraShape,
    matrices: &BTreeMap<(usize, Target), (Tensor, Tensor)>,
    config: &LlamaConfig,
    format: ModelFormat,
) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tensors = std::collections::HashMap::new();
    for (&(layer, target), (a, b)) in matrices {
        let b = match (format, target) {
            (ModelFormat::Gguf, Target::Q) => deinterleave_heads(b, config.num_heads)?,
            (ModelFormat::Gguf, Target::K) => deinterleave_heads(b, config.num_kv_heads)?,
            _ => b.clone(),
        };
        tensors.insert(name(layer, target, Half::A), a.contiguous()?);
        tensors.insert(name(layer, target, Half::B), b.contiguous()?);
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
    let modules: Vec<&str> = shape.targets.iter().map(|t| t.module()).collect();
    let json = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": shape.rank,
        "lora_alpha": shape.alpha,
        "use_rslora": shape.rslora,
        "lora_dropout": 0.0,
        "target_modules": modules,
        "layers_to_transform": shape.layers,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
    });
    let path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&json).expect("a JSON value serializes");
    std::fs::write(&path, text).map_err(io(&path))
}

/// Which of a LoRA pair's matrices a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Half {
    A,
    B,
}

/// PEFT's name of a matrix: `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`.
fn name(layer: usize, target: Target, half: Half) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{half:?}.weight",
        target.path()
    )
}

/// The layer, target and half a PEFT tensor name stands for, if it is one of ours.
fn parse_name(name: &str) -> Option<(usize, Target, Half)> {
    let rest = name.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (path, half) = if let Some(path) = rest.strip_suffix(".lora_A.weight") {
        (path, Half::A)
    } else {
        (rest.strip_suffix(".lora_B.weight")?, Half::B)
    };
    let target = Target::ALL.into_iter().find(|t| t.path() == path)?;
    Some((layer, target, half))
}

/// Reads and parses `adapter_config.json`.
fn read_config(dir: &Path) -> Result<PeftConfig> {
    let path = dir.join("adapter_config.json");
    let bytes = read_bounded(&path, MAX_CONFIG_BYTES)?;
    serde_json::from_slice(&bytes).map_err(|e| ModelError::Adapter {
        dir: dir.to_path_buf(),
        reason: format!("adapter_config.json is not a PEFT LoRA configuration: {e}"),
    })
}

/// The whole file at `path`, refused when it is longer than `limit` bytes.
fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > limit {
        return Err(ModelError::Adapter {
            dir: path.parent().unwrap_or(path).to_path_buf(),
            reason: format!(
                "{} is {len} bytes, more than an adapter of this configuration holds ({limit})",
                path.display()
            ),
        });
    }
    std::fs::read(path).map_err(io)
}

/// The targets `target_modules` names: a list of module names, or PEFT's `all-linear`.
fn targets(value: &serde_json::Value) -> std::result::Result<Vec<Target>, String> {
    let names: Vec<&str> = match value {
        serde_json::Value::String(s) if s == "all-linear" => {
            return Ok(Target::ALL.to_vec());
        }
        serde_json::Value::String(s) => {
            return Err(format!(
                "target_modules {s:?} is a pattern; list the modules instead (q_proj, k_proj, \
                 v_proj, o_proj, gate_proj, up_proj, down_proj)"
            ));
        }
        serde_json::Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or("target_modules holds a value that is not a string")
            })
            .collect::<std::result::Result<_, _>>()?,
        _ => return Err("target_modules is neither a list nor a string".into()),
    };
    let mut targets = Vec::new();
    for name in names {
        let target = Target::ALL
            .into_iter()
            .find(|t| t.module() == name)
            .ok_or_else(|| {
                format!(
                    "unknown target module `{name}`: adapters may target q_proj, k_proj, v_proj, \
                     o_proj, gate_proj, up_proj and down_proj"
                )
            })?;
        targets.push(target);
    }
    targets.sort();
    targets.dedup();
    if targets.is_empty() {
        return Err("target_modules is empty".into());
    }
    Ok(targets)
}

/// `layers_to_transform`: one layer index or a list of them.
fn layer_list(value: &serde_json::Value) -> std::result::Result<BTreeSet<usize>, String> {
    let index = |v: &serde_json::Value| {
        v.as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| format!("layers_to_transform holds {v}, not a layer index"))
    };
    match value {
        serde_json::Value::Array(items) => items.iter().map(index).collect(),
        single => Ok(BTreeSet::from([index(single)?])),
    }
}

/// The inverse of [`interleave_heads`]: GGUF's rows of `b` back in Hugging Face's order.
fn deinterleave_heads(b: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, r) = b.dims2()?;
    let half = rows / heads / 2;
    Ok(b.reshape((heads, half, 2, r))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, r))?)
}

/// The rows of `b (heads * head_dim, r)` in GGUF's order: within each head, the two halves
/// that Hugging Face's RoPE pairs up are interleaved, `[x0, y0, x1, y1, ...]` for
/// `[x0, x1, ..., y0, y1, ...]`, as llama.cpp's converter permutes the base weights.
fn interleave_heads(b: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, r) = b.dims2()?;
    let half = rows / heads / 2;
    Ok(b.reshape((heads, 2, half, r))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, r))?)
}
