use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde::Deserialize;

use crate::{ModelError, Result};

/// How rotary position frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (linear interpolation).
    Linear {
        /// The interpolation factor.
        factor: f32,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        /// Overall scale factor.
        factor: f32,
        /// Wavelengths above `original / low_freq_factor` are fully scaled.
        low_freq_factor: f32,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f32,
        /// The context length the model was trained with.
        original_max_position_embeddings: usize,
    },
    /// Per-frequency divisors stored in the model file (GGUF `rope_freqs.weight`).
    Factors(Vec<f32>),
}

/// The hyper-parameters of a Llama-family decoder, from GGUF metadata or `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Architecture name as declared by the file (`llama`, `mistral`...).
    pub architecture: String,
    /// Vocabulary size (rows of the embedding matrix).
    pub vocab_size: usize,
    /// Width of the hidden state that crosses the split.
    pub hidden_size: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Number of decoder layers, L.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (fewer than query heads with grouped-query attention).
    pub num_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// True when RoPE rotates interleaved pairs (GGUF's permuted Q/K), false for halves (HF).
    pub rope_interleaved: bool,
    /// Maximum sequence length.
    pub context_length: usize,
    /// True when the LM head reuses the token embedding matrix.
    pub tied_embeddings: bool,
}

fn md<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    metadata
        .get(key)
        .ok_or_else(|| ModelError::Config(format!("GGUF metadata key `{key}` is missing")))
}

fn md_usize(metadata: &HashMap<String, Value>, key: &str) -> Result<usize> {
    let value = md(metadata, key)?;
    let n = match value {
        Value::U8(v) => u64::from(*v),
        Value::U16(v) => u64::from(*v),
        Value::U32(v) => u64::from(*v),
        Value::U64(v) => *v,
        Value::I8(v) => u64::try_from(*v).unwrap_or(u64::MAX),
        Value::I16(v) => u64::try_from(*v).unwrap_or(u64::MAX),
        Value::I32(v) => u64::try_from(*v).unwrap_or(u64::MAX),
        Value::I64(v) => u64::try_from(*v).unwrap_or(u64::MAX),
        other => {
            return Err(ModelError::Config(format!(
                "GGUF metadata key `{key}` should be an integer, found {:?}",
                other.value_type()
            )));
        }
    };
    usize::try_from(n)
        .ok()
        .filter(|&n| n < (1 << 40))
        .ok_or_else(|| ModelError::Config(format!("GGUF metadata key `{key}` is out of range")))
}

fn md_f32(metadata: &HashMap<String, Value>, key: &str) -> Result<f32> {
    match md(metadata, key)? {
        Value::F32(v) => Ok(*v),
        Value::F64(v) => Ok(*v as f32),
        other => Err(ModelError::Config(format!(
            "GGUF metadata key `{key}` should be a float, found {:?}",
            other.value_type()
        ))),
    }
}

impl LlamaConfig {
    /// Reads the configuration of a llama-architecture GGUF file.
    ///
    /// `has_output` says whether the file has a separate `output.weight` (untied LM head);
    /// `rope_factors` are the contents of `rope_freqs.weight` when present.
    pub fn from_gguf(
        metadata: &HashMap<String, Value>,
        has_output: bool,
        rope_factors: Option<Vec<f32>>,
    ) -> Result<Self> {
        let arch = md(metadata, "general.architecture")?
            .to_string()
            .map_err(|_| ModelError::Config("`general.architecture` is not a string".into()))?
            .clone();
        if !matches!(arch.as_str(), "llama" | "mistral") {
            return Err(ModelError::UnknownArchitecture(arch));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let hidden_size = md_usize(metadata, &key("embedding_length"))?;
        let num_heads = md_usize(metadata, &key("attention.head_count"))?;
        let num_kv_heads = match metadata.get(&key("attention.head_count_kv")) {
            Some(_) => md_usize(metadata, &key("attention.head_count_kv"))?,
            None => num_heads,
        };
        let num_layers = md_usize(metadata, &key("block_count"))?;
        let intermediate_size = md_usize(metadata, &key("feed_forward_length"))?;
        let context_length = md_usize(metadata, &key("context_length"))?;
        let rms_norm_eps = f64::from(md_f32(metadata, &key("attention.layer_norm_rms_epsilon"))?);
        let rope_theta = match metadata.get(&key("rope.freq_base")) {
            Some(_) => md_f32(metadata, &key("rope.freq_base"))?,
            None => 10_000.0,
        };
        let head_dim = match metadata.get(&key("rope.dimension_count")) {
            Some(_) => md_usize(metadata, &key("rope.dimension_count"))?,
            None => hidden_size / num_heads.max(1),
        };
        let vocab_size = match metadata.get(&key("vocab_size")) {
            Some(_) => md_usize(metadata, &key("vocab_size"))?,
            None => match metadata.get("tokenizer.ggml.tokens") {
                Some(Value::Array(tokens)) => tokens.len(),
                _ => 0,
            },
        };
        let rope_scaling = if let Some(factors) = rope_factors {
            RopeScaling::Factors(factors)
        } else {
            match metadata
                .get(&key("rope.scaling.type"))
                .map(|v| v.to_string())
            {
                Some(Ok(kind)) if kind == "linear" => RopeScaling::Linear {
                    factor: md_f32(metadata, &key("rope.scaling.factor"))?,
                },
                Some(Ok(kind)) if kind != "none" => {
                    return Err(ModelError::Config(format!(
                        "unsupported RoPE scaling type `{kind}`"
                    )));
                }
                _ => RopeScaling::None,
            }
        };
        let config = Self {
            architecture: arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            rope_interleaved: true,
            context_length,
            tied_embeddings: !has_output,
        };
        config.validate()
    }

    /// Reads a Hugging Face `config.json` of a `LlamaForCausalLM` / `MistralForCausalLM` model.
    pub fn from_hf_json(json: &str) -> Result<Self> {
        let parse_err = |e: serde_json::Error| ModelError::Config(format!("config.json: {e}"));
        // The architecture is checked first: another family's config (GPT-2's `n_embd`...)
        // lacks Llama's fields, and must be named as unsupported rather than incomplete.
        let named: HfArchitecture = serde_json::from_str(json).map_err(parse_err)?;
        let arch = named
            .architectures
            .first()
            .cloned()
            .or(named.model_type)
            .unwrap_or_default();
        let supported = ["LlamaForCausalLM", "MistralForCausalLM", "llama", "mistral"];
        if !supported.contains(&arch.as_str()) {
            return Err(ModelError::UnknownArchitecture(arch));
        }
        let raw: HfConfig = serde_json::from_str(json).map_err(parse_err)?;
        let rope_scaling = match raw.rope_scaling {
            None => RopeScaling::None,
            Some(s) => {
                let kind = s.rope_type.or(s.kind).unwrap_or_default();
                match kind.as_str() {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear {
                        factor: s.factor.unwrap_or(1.0),
                    },
                    "llama3" => RopeScaling::Llama3 {
                        factor: s.factor.unwrap_or(1.0),
                        low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                        high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                        original_max_position_embeddings: s
                            .original_max_position_embeddings
                            .unwrap_or(8192),
                    },
                    other => {
                        return Err(ModelError::Config(format!(
                            "config.json: unsupported rope_scaling type `{other}`"
                        )));
                    }
                }
            }
        };
        let num_heads = raw.num_attention_heads;
        let config = Self {
            architecture: arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(num_heads),
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / num_heads.max(1)),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            rope_interleaved: false,
            context_length: raw.max_position_embeddings.unwrap_or(4096),
            tied_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        };
        config.validate()
    }

    fn validate(self) -> Result<Self> {
        let bad = |what: &str| Err(ModelError::Config(what.to_string()));
        if self.hidden_size == 0 || self.num_heads == 0 || self.num_kv_heads == 0 {
            return bad("hidden size and head counts must be positive");
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(ModelError::Config(format!(
                "{} attention heads cannot be grouped over {} key/value heads",
                self.num_heads, self.num_kv_heads
            )));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(ModelError::Config(format!(
                "head dimension {} must be even and positive",
                self.head_dim
            )));
        }
        if self.vocab_size == 0 || self.context_length == 0 || self.intermediate_size == 0 {
            return bad("vocabulary, context length and feed-forward size must be positive");
        }
        Ok(self)
    }

    /// The RoPE inverse frequencies, one per rotated pair, after scaling.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| 1f32 / self.rope_theta.powf(i as f32 / d as f32))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Factors(factors) => base
                .iter()
                .zip(factors.iter().chain(std::iter::repeat(&1.0)))
                .map(|(f, s)| f / s)
                .collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let original = *original_max_position_embeddings as f32;
                let low_wavelen = original / low_freq_factor;
                let high_wavelen = original / high_freq_factor;
                base.iter()
                    .map(|&freq| {
                        let wavelen = 2.0 * std::f32::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / factor
                        } else {
                            let smooth = (original / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect()
            }
        }
    }
}

#[derive(Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

#[derive(Deserialize)]
struct HfArchitecture {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
}

#[derive(Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f32>,
    rope_scaling: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
}
