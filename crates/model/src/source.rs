use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::adapter::Adapter;
use crate::kernels::Linear;
use crate::llama::{Layer, LayerSpans, ModelPart, OutputHead};
use crate::{KvPrecision, LlamaConfig, ModelError, PartSpec, Result};

/// The file format a model was loaded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// A single GGUF file (quantized or float tensors, tokenizer in the metadata).
    Gguf,
    /// A Hugging Face directory: config.json, *.safetensors (possibly sharded), tokenizer.json.
    HuggingFace,
}

/// Where the tokenizer of a model comes from, for the tokenizer crate to build it.
#[derive(Debug, Clone, Copy)]
pub enum TokenizerSource<'a> {
    /// The `tokenizer.ggml.*` keys of a GGUF file.
    Gguf(&'a HashMap<String, Value>),
    /// A Hugging Face directory holding tokenizer.json.
    HuggingFace(&'a Path),
}

/// One tensor a part holds, as `lsplit inspect` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRecord {
    /// Name in the model file.
    pub name: String,
    /// Shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// Storage type once loaded (`q4_1`, `f32`...).
    pub dtype: String,
    /// Bytes the loaded tensor occupies in memory.
    pub bytes: u64,
}

impl TensorRecord {
    /// Number of parameters (elements) of the tensor.
    pub fn params(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// What a weight is for, independent of how a file format names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Weight {
    Embeddings,
    Output,
    FinalNorm,
    RopeFactors,
    AttnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    O(usize),
    FfnNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

impl Weight {
    pub(crate) fn layer(i: usize) -> [Self; 9] {
        [
            Self::AttnNorm(i),
            Self::Q(i),
            Self::K(i),
            Self::V(i),
            Self::O(i),
            Self::FfnNorm(i),
            Self::Gate(i),
            Self::Up(i),
            Self::Down(i),
        ]
    }

    fn name(self, format: ModelFormat) -> String {
        match format {
            ModelFormat::Gguf => match self {
                Self::Embeddings => "token_embd.weight".into(),
                Self::Output => "output.weight".into(),
                Self::FinalNorm => "output_norm.weight".into(),
                Self::RopeFactors => "rope_freqs.weight".into(),
                Self::AttnNorm(i) => format!("blk.{i}.attn_norm.weight"),
                Self::Q(i) => format!("blk.{i}.attn_q.weight"),
                Self::K(i) => format!("blk.{i}.attn_k.weight"),
                Self::V(i) => format!("blk.{i}.attn_v.weight"),
                Self::O(i) => format!("blk.{i}.attn_output.weight"),
                Self::FfnNorm(i) => format!("blk.{i}.ffn_norm.weight"),
                Self::Gate(i) => format!("blk.{i}.ffn_gate.weight"),
                Self::Up(i) => format!("blk.{i}.ffn_up.weight"),
                Self::Down(i) => format!("blk.{i}.ffn_down.weight"),
            },
            ModelFormat::HuggingFace => match self {
                Self::Embeddings => "model.embed_tokens.weight".into(),
                Self::Output => "lm_head.weight".into(),
                Self::FinalNorm => "model.norm.weight".into(),
                Self::RopeFactors => "rope_freqs.weight".into(),
                Self::AttnNorm(i) => format!("model.layers.{i}.input_layernorm.weight"),
                Self::Q(i) => format!("model.layers.{i}.self_attn.q_proj.weight"),
                Self::K(i) => format!("model.layers.{i}.self_attn.k_proj.weight"),
                Self::V(i) => format!("model.layers.{i}.self_attn.v_proj.weight"),
                Self::O(i) => format!("model.layers.{i}.self_attn.o_proj.weight"),
                Self::FfnNorm(i) => format!("model.layers.{i}.post_attention_layernorm.weight"),
                Self::Gate(i) => format!("model.layers.{i}.mlp.gate_proj.weight"),
                Self::Up(i) => format!("model.layers.{i}.mlp.up_proj.weight"),
                Self::Down(i) => format!("model.layers.{i}.mlp.down_proj.weight"),
            },
        }
    }

    /// The shape the configuration implies, outermost dimension first.
    fn expected_shape(self, c: &LlamaConfig) -> Vec<usize> {
        let q = c.num_heads * c.head_dim;
        let kv = c.num_kv_heads * c.head_dim;
        match self {
            Self::Embeddings | Self::Output => vec![c.vocab_size, c.hidden_size],
            Self::FinalNorm | Self::AttnNorm(_) | Self::FfnNorm(_) => vec![c.hidden_size],
            Self::RopeFactors => vec![c.head_dim / 2],
            Self::Q(_) => vec![q, c.hidden_size],
            Self::K(_) | Self::V(_) => vec![kv, c.hidden_size],
            Self::O(_) => vec![c.hidden_size, q],
            Self::Gate(_) | Self::Up(_) => vec![c.intermediate_size, c.hidden_size],
            Self::Down(_) => vec![c.hidden_size, c.intermediate_size],
        }
    }
}

/// The weights behind a model, read lazily one tensor at a time.
enum Store {
    Gguf {
        path: PathBuf,
        content: Content,
    },
    Safetensors {
        dir: PathBuf,
        files: MmapedSafetensors,
    },
}

/// A model opened from disk: its configuration and access to its tensors.
///
/// Opening reads only headers; tensors are read when a part is loaded, and each part reads only
/// its own.
pub struct ModelSource {
    path: PathBuf,
    format: ModelFormat,
    config: LlamaConfig,
    store: Store,
    kv_precision: KvPrecision,
    adapter: Option<Arc<Adapter>>,
}

impl std::fmt::Debug for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSource")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("config", &self.config)
            .field("kv_precision", &self.kv_precision)
            .field("adapter", &self.adapter.as_ref().map(|a| a.dir()))
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl ModelSource {
    /// Opens a GGUF file or a Hugging Face model directory.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        if meta.is_dir() {
            Self::open_hf(path)
        } else {
            Self::open_gguf(path)
        }
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(io_err(path))?;
        let mut reader = BufReader::new(file);
        if zero_alignment(&mut reader).unwrap_or(false) {
            return Err(ModelError::MalformedGguf {
                path: path.to_path_buf(),
                reason: "general.alignment is 0".into(),
            });
        }
        reader.rewind().map_err(io_err(path))?;
        // Should candle's reader still panic on some other crafted header, a bad file must be
        // an error, never a crash.
        let read =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut reader)));
        let content = match read {
            Ok(read) => read.map_err(|e| e.to_string()),
            Err(panic) => Err(format!(
                "the GGUF reader failed: {}",
                panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default()
            )),
        }
        .map_err(|reason| ModelError::MalformedGguf {
            path: path.to_path_buf(),
            reason,
        })?;
        let has_output = content
            .tensor_infos
            .contains_key(&Weight::Output.name(ModelFormat::Gguf));
        let factors_name = Weight::RopeFactors.name(ModelFormat::Gguf);
        let rope_factors = if content.tensor_infos.contains_key(&factors_name) {
            let t = content
                .tensor(&mut reader, &factors_name, &Device::Cpu)
                .map_err(|e| ModelError::MalformedGguf {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
            Some(
                t.dequantize(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            )
        } else {
            None
        };
        let config = LlamaConfig::from_gguf(&content.metadata, has_output, rope_factors)?;
        Ok(Self {
            path: path.to_path_buf(),
            format: ModelFormat::Gguf,
            config,
            kv_precision: KvPrecision::default(),
            adapter: None,
            store: Store::Gguf {
                path: path.to_path_buf(),
                content,
            },
        })
    }

    fn open_hf(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(ModelError::NotAModel {
                path: dir.to_path_buf(),
            });
        }
        let json = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
        let mut config = LlamaConfig::from_hf_json(&json)?;
        let files = safetensors_files(dir)?;
        // SAFETY: the model files are mapped read-only; lambda-split never writes them, and
        // like every safetensors loader we rely on the user not truncating them while in use.
        let files = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| {
            ModelError::Config(format!("{}: unreadable safetensors: {e}", dir.display()))
        })?;
        if files
            .get(&Weight::Output.name(ModelFormat::HuggingFace))
            .is_err()
        {
            config.tied_embeddings = true;
        }
        Ok(Self {
            path: dir.to_path_buf(),
            format: ModelFormat::HuggingFace,
            config,
            kv_precision: KvPrecision::default(),
            adapter: None,
            store: Store::Safetensors {
                dir: dir.to_path_buf(),
                files,
            },
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The format the model was read from.
    pub fn format(&self) -> ModelFormat {
        self.format
    }

    /// The path the model was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the tokenizer lives.
    pub fn tokenizer_source(&self) -> TokenizerSource<'_> {
        match &self.store {
            Store::Gguf { content, .. } => TokenizerSource::Gguf(&content.metadata),
            Store::Safetensors { dir, .. } => TokenizerSource::HuggingFace(dir),
        }
    }

    fn part_weights(&self, spec: &PartSpec) -> Vec<Weight> {
        let mut weights = Vec::new();
        if spec.kind.has_embeddings() {
            weights.push(Weight::Embeddings);
        }
        for i in spec.layers.clone() {
            weights.extend(Weight::layer(i));
        }
        if spec.kind.has_output() {
            weights.push(Weight::FinalNorm);
            if !self.config.tied_embeddings {
                weights.push(Weight::Output);
            } else if !spec.kind.has_embeddings() {
                weights.push(Weight::Embeddings);
            }
        }
        weights
    }

    /// The tensors a part would hold, without reading their data.
    pub fn part_tensors(&self, spec: &PartSpec) -> Result<Vec<TensorRecord>> {
        self.check_layers(spec)?;
        self.part_weights(spec)
            .into_iter()
            .map(|w| self.record(w))
            .collect()
    }

    fn check_layers(&self, spec: &PartSpec) -> Result<()> {
        if spec.layers.start > spec.layers.end || spec.layers.end > self.config.num_layers {
            return Err(ModelError::InvalidSplit {
                k1: spec.layers.start,
                k2: spec.layers.end,
                layers: self.config.num_layers,
            });
        }
        Ok(())
    }

    fn record(&self, weight: Weight) -> Result<TensorRecord> {
        let name = weight.name(self.format);
        let (shape, dtype, bytes) = match &self.store {
            Store::Gguf { content, .. } => {
                let info = content
                    .tensor_infos
                    .get(&name)
                    .ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
                let shape = info.shape.dims().to_vec();
                // Saturating: a crafted header may declare dimensions whose product overflows;
                // the shape check below then refuses the tensor.
                let elems = shape.iter().fold(1usize, |n, &d| n.saturating_mul(d));
                let bytes = (elems / info.ggml_dtype.block_size())
                    .saturating_mul(info.ggml_dtype.type_size());
                (shape, ggml_name(info.ggml_dtype), bytes as u64)
            }
            Store::Safetensors { files, .. } => {
                let view = files
                    .get(&name)
                    .map_err(|_| ModelError::MissingTensor(name.clone()))?;
                let shape = view.shape().to_vec();
                let bytes = shape.iter().product::<usize>() * DType::F32.size_in_bytes();
                (shape, "f32".to_string(), bytes as u64)
            }
        };
        let expected = weight.expected_shape(&self.config);
        if shape != expected {
            return Err(ModelError::TensorShape {
                name,
                expected,
                got: shape,
            });
        }
        Ok(TensorRecord {
            name,
            shape,
            dtype,
            bytes,
        })
    }

    /// The bytes of tensor `name` exactly as the model file stores them (quantized blocks
    /// included), so two copies of a model can be compared without loading them.
    pub fn stored_bytes(&self, name: &str) -> Result<Vec<u8>> {
        match &self.store {
            Store::Gguf { path, content } => {
                use std::io::{Read, Seek, SeekFrom};
                let info = content
                    .tensor_infos
                    .get(name)
                    .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
                let elems = info.shape.elem_count();
                let len = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
                let mut file = File::open(path).map_err(io_err(path))?;
                file.seek(SeekFrom::Start(content.tensor_data_offset + info.offset))
                    .map_err(io_err(path))?;
                let mut bytes = vec![0; len];
                file.read_exact(&mut bytes).map_err(io_err(path))?;
                Ok(bytes)
            }
            Store::Safetensors { files, .. } => files
                .get(name)
                .map(|view| view.data().to_vec())
                .map_err(|_| ModelError::MissingTensor(name.to_string())),
        }
    }

    /// Makes the parts loaded from now on keep their KV caches at `precision` (f32 unless set).
    pub fn set_kv_precision(&mut self, precision: KvPrecision) {
        self.kv_precision = precision;
    }

    /// Reads the LoRA adapter in `dir` (PEFT's format) for this model: the parts loaded from
    /// now on apply its updates on the layers they run.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let adapter = Adapter::open(dir, &self.config, self.format)?;
        self.adapter = Some(Arc::new(adapter));
        Ok(())
    }

    /// The adapter the parts loaded from now on apply, if any.
    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_deref()
    }

    /// Loads one part of the model onto `device`, reading only the tensors it holds (and the
    /// adapter's updates of its layers, when an adapter is loaded).
    pub fn load_part(&self, spec: &PartSpec, device: &Device) -> Result<ModelPart> {
        if self.adapter.is_some() && !device.is_cpu() {
            return Err(ModelError::Config(
                "a LoRA adapter is applied on the CPU only: load the part with the adapter on the \
                 CPU"
                .into(),
            ));
        }
        let records = self.part_tensors(spec)?;
        let mut loader = Loader::new(self, device)?;
        let embeddings = if spec.kind.has_embeddings() || self.tied_output(spec) {
            Some(loader.linear(Weight::Embeddings)?)
        } else {
            None
        };
        let layers = spec
            .layers
            .clone()
            .map(|i| {
                Ok(Layer {
                    attn_norm: loader.vector(Weight::AttnNorm(i))?,
                    wq: loader.linear(Weight::Q(i))?,
                    wk: loader.linear(Weight::K(i))?,
                    wv: loader.linear(Weight::V(i))?,
                    wo: loader.linear(Weight::O(i))?,
                    ffn_norm: loader.vector(Weight::FfnNorm(i))?,
                    w_gate: loader.linear(Weight::Gate(i))?,
                    w_up: loader.linear(Weight::Up(i))?,
                    w_down: loader.linear(Weight::Down(i))?,
                    lora: self
                        .adapter
                        .as_ref()
                        .map(|a| a.layer(i))
                        .unwrap_or_default(),
                    spans: LayerSpans::new(i),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let output = if spec.kind.has_output() {
            let lm_head = match (&embeddings, self.config.tied_embeddings) {
                (Some(e), true) => e.clone(),
                _ => loader.linear(Weight::Output)?,
            };
            Some(OutputHead {
                norm: loader.vector(Weight::FinalNorm)?,
                lm_head,
            })
        } else {
            None
        };
        let embeddings = embeddings.filter(|_| spec.kind.has_embeddings());
        ModelPart::new(
            spec.clone(),
            self.config.clone(),
            embeddings,
            layers,
            output,
            records,
            device.clone(),
        )
        .map(|part| part.with_kv_precision(self.kv_precision))
    }

    /// The weights `weights`, checked against the configuration's shapes and read as f32 on
    /// the CPU (quantized ones dequantized): the training pass's dense copy of one layer or of
    /// the output head, read when needed so that only that much is held at once.
    pub(crate) fn dense<const N: usize>(&self, weights: [Weight; N]) -> Result<[Tensor; N]> {
        let mut loader = Loader::new(self, &Device::Cpu)?;
        let mut read = Vec::with_capacity(N);
        for weight in weights {
            self.record(weight)?;
            read.push(loader.vector(weight)?);
        }
        Ok(read.try_into().expect("one tensor per weight"))
    }

    fn tied_output(&self, spec: &PartSpec) -> bool {
        spec.kind.has_output() && self.config.tied_embeddings
    }
}

/// Reads tensors of one part from the store.
struct Loader<'a> {
    source: &'a ModelSource,
    device: &'a Device,
    reader: Option<BufReader<File>>,
}

impl<'a> Loader<'a> {
    fn new(source: &'a ModelSource, device: &'a Device) -> Result<Self> {
        let reader = match &source.store {
            Store::Gguf { path, .. } => {
                Some(BufReader::new(File::open(path).map_err(io_err(path))?))
            }
            Store::Safetensors { .. } => None,
        };
        Ok(Self {
            source,
            device,
            reader,
        })
    }

    fn read(&mut self, weight: Weight) -> Result<Either> {
        let name = weight.name(self.source.format);
        match (&self.source.store, self.reader.as_mut()) {
            (Store::Gguf { content, path }, Some(reader)) => content
                .tensor(reader, &name, self.device)
                .map(Either::Quantized)
                .map_err(|e| ModelError::MalformedGguf {
                    path: path.clone(),
                    reason: format!("reading `{name}`: {e}"),
                }),
            (Store::Safetensors { files, .. }, _) => files
                .load(&name, self.device)
                .map(Either::Float)
                .map_err(|_| ModelError::MissingTensor(name.clone())),
            (Store::Gguf { path, .. }, None) => Err(ModelError::NotAModel { path: path.clone() }),
        }
    }

    /// A weight matrix: quantized as stored; float weights in f32 on the CPU, and on a GPU in
    /// half precision (bf16 kept as stored, anything else as f16), where its products run.
    fn linear(&mut self, weight: Weight) -> Result<Linear> {
        if let Some(ours) = self.read_repacked(weight) {
            return ours;
        }
        Ok(match self.read(weight)? {
            Either::Quantized(q) => Linear::new(QMatMul::from_arc(Arc::new(q))?),
            Either::Float(t) if self.device.is_cpu() => {
                Linear::new(QMatMul::Tensor(t.to_dtype(DType::F32)?))
            }
            Either::Float(t) if t.dtype() == DType::BF16 => Linear::Half(t),
            Either::Float(t) => Linear::Half(t.to_dtype(DType::F16)?),
        })
    }

    /// A GGUF matrix our kernels cover on the CPU, read from the file straight into its tiles
    /// (see [`Linear::read_gguf`]): candle's reader would hold the tensor twice more, a peak
    /// of three copies of the largest matrix (the output head) above the weights. `None` where
    /// that does not apply (nothing read).
    fn read_repacked(&mut self, weight: Weight) -> Option<Result<Linear>> {
        let (Store::Gguf { content, path }, Some(reader)) =
            (&self.source.store, self.reader.as_mut())
        else {
            return None;
        };
        let name = weight.name(self.source.format);
        let info = content
            .tensor_infos
            .get(&name)
            .filter(|_| self.device.is_cpu())?;
        let malformed = |reason: String| ModelError::MalformedGguf {
            path: path.clone(),
            reason: format!("reading `{name}`: {reason}"),
        };
        // The tensor must lie inside the file before anything is allocated for it.
        let dtype = info.ggml_dtype;
        let blocks = (info.shape.elem_count() / dtype.block_size()) as u64;
        let bytes = blocks.saturating_mul(dtype.type_size() as u64);
        let start = content.tensor_data_offset.saturating_add(info.offset);
        let len = match reader.get_ref().metadata() {
            Ok(meta) => meta.len(),
            Err(e) => return Some(Err(malformed(e.to_string()))),
        };
        if start.saturating_add(bytes) > len {
            let remaining = len.saturating_sub(start);
            return Some(Err(malformed(format!(
                "the tensor needs {bytes} bytes at offset {start}, only {remaining} remain in \
                 the file"
            ))));
        }
        if let Err(e) = reader.seek(std::io::SeekFrom::Start(start)) {
            return Some(Err(malformed(e.to_string())));
        }
        Linear::read_gguf(dtype, info.shape.dims(), reader)
            .map(|read| read.map_err(|e| malformed(e.to_string())))
    }

    fn vector(&mut self, weight: Weight) -> Result<Tensor> {
        Ok(match self.read(weight)? {
            Either::Quantized(q) => q.dequantize(self.device)?,
            Either::Float(t) => t.to_dtype(DType::F32)?,
        })
    }
}

enum Either {
    Quantized(QTensor),
    Float(Tensor),
}

fn ggml_name(dtype: GgmlDType) -> String {
    format!("{dtype:?}").to_lowercase()
}

/// The safetensors files of a Hugging Face directory: those named by the shard index when
/// there is one, else `model.safetensors`, else every `*.safetensors` file.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let json = std::fs::read_to_string(&index).map_err(io_err(&index))?;
        let value: serde_json::Value = serde_json::from_str(&json)
            .map_err(|e| ModelError::Config(format!("{}: {e}", index.display())))?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                ModelError::Config(format!("{}: no `weight_map` object", index.display()))
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            return Err(ModelError::Config(format!(
                "{} names shard {} which does not exist",
                index.display(),
                missing.display()
            )));
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Config(format!(
            "{}: no *.safetensors weights found",
            dir.display()
        )));
    }
    Ok(files)
}

/// Whether a GGUF header sets `general.alignment` to 0, which candle's reader (0.11) divides by
/// and panics on. It walks the metadata as the format lays it out, skipping every other value;
/// anything unreadable is left to candle's own checks (`Err` or `false`). Each value read moves
/// forward in the file, so the walk ends by the file's end. Hand-written because candle keeps its
/// value reader private; remove it once candle refuses a zero alignment.
fn zero_alignment(reader: &mut (impl Read + Seek)) -> std::io::Result<bool> {
    let mut magic = [0; 4];
    reader.read_exact(&mut magic)?;
    if &magic != b"GGUF" {
        return Ok(false);
    }
    // GGUF v1 counts and lengths are 32-bit, later versions' 64-bit.
    let v1 = read_u32(reader)? == 1;
    let _tensors = read_length(reader, v1)?;
    let entries = read_length(reader, v1)?;
    // candle keeps the last of repeated keys.
    let mut zero = false;
    for _ in 0..entries {
        let key_len = read_length(reader, v1)?;
        if key_len > 65_536 {
            return Ok(false);
        }
        let mut key = vec![0; key_len as usize];
        reader.read_exact(&mut key)?;
        let kind = read_u32(reader)?;
        // u8, i8, u16, i16, u32 and i32: the types candle takes the alignment from.
        let size = match kind {
            0 | 1 => 1,
            2 | 3 => 2,
            4 | 5 => 4,
            _ => 0,
        };
        if key == b"general.alignment" && size > 0 {
            let mut value = [0u8; 4];
            reader.read_exact(&mut value[..size])?;
            zero = value == [0; 4];
        } else {
            zero &= key != b"general.alignment";
            skip_value(reader, kind, v1, 0)?;
        }
    }
    Ok(zero)
}

fn read_u32(reader: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0; 4];
    reader.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// A GGUF count or string length: 32-bit in version 1, 64-bit after.
fn read_length(reader: &mut impl Read, v1: bool) -> std::io::Result<u64> {
    if v1 {
        return read_u32(reader).map(u64::from);
    }
    let mut b = [0; 8];
    reader.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Skips one GGUF metadata value of type `kind` (arrays nest at most 4 deep here).
fn skip_value(
    reader: &mut (impl Read + Seek),
    kind: u32,
    v1: bool,
    depth: u32,
) -> std::io::Result<()> {
    let invalid = || std::io::Error::from(std::io::ErrorKind::InvalidData);
    let fixed = |kind| match kind {
        0 | 1 | 7 => Some(1u64),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    };
    let bytes = match kind {
        8 => read_length(reader, v1)?,
        9 if depth < 4 => {
            let item = read_u32(reader)?;
            let count = read_length(reader, v1)?;
            match fixed(item) {
                Some(size) => count.checked_mul(size).ok_or_else(invalid)?,
                None => {
                    for _ in 0..count {
                        skip_value(reader, item, v1, depth + 1)?;
                    }
                    0
                }
            }
        }
        _ => fixed(kind).ok_or_else(invalid)?,
    };
    let bytes = i64::try_from(bytes).map_err(|_| invalid())?;
    reader.seek_relative(bytes)
}
