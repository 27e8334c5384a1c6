//! The trunk fingerprint: what the server and the device compare in the handshake to be sure
//! they hold the same trunk weights.

use std::fmt;
use std::ops::Range;

use sha2::{Digest, Sha256};

use crate::{
    Adapter, LlamaConfig, ModelError, ModelSource, PartKind, PartSpec, RopeScaling, TensorRecord,
};

/// Identity of a trunk: its layers within the model and a SHA-256 over the model's
/// configuration and the trunk tensors' names, shapes, types and stored bytes.
///
/// The server sends its trunk's fingerprint in the handshake; the device computes one from its
/// own model file and refuses to run against different weights.
///
/// The digest covers, in this order (integers as `u64` and floats as their own width, all
/// little-endian; strings and byte blobs as their `u64` length then their bytes; booleans as
/// one byte, 0 or 1):
/// 1. the tag `lsplit trunk fingerprint v1`;
/// 2. the trunk's first layer and end layer;
/// 3. the configuration, field by field (see [`config_bytes`]);
/// 4. the number of trunk tensors, then for each, in the model's order: its name, its rank and
///    dimensions (outermost first), its storage type name (`q4_1`, `f32`...), its stored bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrunkFingerprint {
    /// The trunk's layers, `[k1, k2)`.
    pub layers: Range<usize>,
    /// Layers of the whole model.
    pub model_layers: usize,
    /// Width of a hidden row.
    pub hidden_size: usize,
    /// The digest.
    pub sha256: [u8; 32],
}

impl TrunkFingerprint {
    /// Fingerprints layers `layers` of `source`, reading the bytes of every trunk tensor.
    pub fn compute(source: &ModelSource, layers: Range<usize>) -> Result<Self, ModelError> {
        let spec = PartSpec {
            kind: PartKind::Trunk,
            layers: layers.clone(),
        };
        let config = source.config();
        let tensors = source.part_tensors(&spec)?;
        let sha256 = digest(&layers, config, &tensors, |name| source.stored_bytes(name))?;
        Ok(Self {
            layers,
            model_layers: config.num_layers,
            hidden_size: config.hidden_size,
            sha256,
        })
    }

    /// This fingerprint extended over the updates `adapter` makes to the trunk's layers, or
    /// unchanged when it makes none: a server that adapts its own layers announces it, so a
    /// device that holds only the public weights refuses its different trunk.
    ///
    /// The new digest is the SHA-256 of: the tag `lsplit trunk adapter v1`; the base digest's
    /// 32 bytes; the number of updates; then for each, by layer then target (q, k, v, o, gate,
    /// up, down): the layer, the module name (`q_proj`...), the scale (`f64`), and `A (r, in)`
    /// then `B (out, r)` as applied (B of q and k in a GGUF model's row order), each as its
    /// value count then its `f32` values row by row (same encodings as above).
    pub fn with_adapter(self, adapter: &Adapter) -> Result<Self, ModelError> {
        let updates: Vec<_> = adapter.updates_in(self.layers.clone()).collect();
        if updates.is_empty() {
            return Ok(self);
        }
        let mut fields = FieldBytes::default();
        fields.bytes(ADAPTER_TAG);
        fields.raw(&self.sha256);
        fields.usize(updates.len());
        for (layer, target, lora) in updates {
            let (scale, a, b) = lora.digest_parts()?;
            fields.usize(layer);
            fields.bytes(target.module().as_bytes());
            fields.f64(scale);
            for matrix in [a, b] {
                fields.usize(matrix.len());
                for value in matrix {
                    fields.f32(value);
                }
            }
        }
        Ok(Self {
            sha256: Sha256::digest(&fields.0).into(),
            ..self
        })
    }

    /// The digest in hexadecimal.
    pub fn hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The SHA-256 of a trunk in the layout documented on [`TrunkFingerprint`]; `stored` reads a
/// tensor's bytes as stored in the model file, one tensor at a time.
fn digest(
    layers: &Range<usize>,
    config: &LlamaConfig,
    tensors: &[TensorRecord],
    mut stored: impl FnMut(&str) -> Result<Vec<u8>, ModelError>,
) -> Result<[u8; 32], ModelError> {
    let mut fields = FieldBytes::default();
    fields.bytes(TAG);
    fields.usize(layers.start);
    fields.usize(layers.end);
    fields.raw(&config_bytes(config));
    fields.usize(tensors.len());
    let mut hash = Sha256::new();
    hash.update(&fields.0);
    for record in tensors {
        let mut fields = FieldBytes::default();
        fields.bytes(record.name.as_bytes());
        fields.usize(record.shape.len());
        for &dim in &record.shape {
            fields.usize(dim);
        }
        fields.bytes(record.dtype.as_bytes());
        let bytes = stored(&record.name)?;
        fields.usize(bytes.len());
        hash.update(&fields.0);
        hash.update(&bytes);
    }
    Ok(hash.finalize().into())
}

/// Opens every fingerprint digest; the version changes whenever the layout below does.
const TAG: &[u8] = b"lsplit trunk fingerprint v1";

/// Opens the digest of a trunk whose layers carry an adapter's updates.
const ADAPTER_TAG: &[u8] = b"lsplit trunk adapter v1";

/// The fields of a digest's input, written in the documented fixed layout.
#[derive(Default)]
struct FieldBytes(Vec<u8>);

impl FieldBytes {
    fn raw(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    fn usize(&mut self, value: usize) {
        self.raw(&(value as u64).to_le_bytes());
    }

    fn f32(&mut self, value: f32) {
        self.raw(&value.to_le_bytes());
    }

    fn f64(&mut self, value: f64) {
        self.raw(&value.to_le_bytes());
    }

    fn bool(&mut self, value: bool) {
        self.raw(&[u8::from(value)]);
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.usize(bytes.len());
        self.raw(bytes);
    }
}

/// The configuration's part of the digest input, every field in this order: architecture
/// (string), vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
/// head_dim (`u64` each), rms_norm_eps (`f64`), rope_theta (`f32`), rope_scaling (one byte,
/// then its parameters: 0 none; 1 linear, factor `f32`; 2 Llama 3, factor, low_freq_factor,
/// high_freq_factor `f32` and original_max_position_embeddings `u64`; 3 factors, their count
/// `u64` and each `f32`), rope_interleaved (bool), context_length (`u64`), tied_embeddings
/// (bool).
fn config_bytes(config: &LlamaConfig) -> Vec<u8> {
    // Destructured so that a new configuration field cannot be left out of the digest.
    let LlamaConfig {
        architecture,
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
        rope_interleaved,
        context_length,
        tied_embeddings,
    } = config;
    let mut fields = FieldBytes::default();
    fields.bytes(architecture.as_bytes());
    for &n in [
        vocab_size,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
    ] {
        fields.usize(n);
    }
    fields.f64(*rms_norm_eps);
    fields.f32(*rope_theta);
    match rope_scaling {
        RopeScaling::None => fields.raw(&[0]),
        RopeScaling::Linear { factor } => {
            fields.raw(&[1]);
            fields.f32(*factor);
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            fields.raw(&[2]);
            fields.f32(*factor);
            fields.f32(*low_freq_factor);
            fields.f32(*high_freq_factor);
            fields.usize(*original_max_position_embeddings);
        }
        RopeScaling::Factors(factors) => {
            fields.raw(&[3]);
            fields.usize(factors.len());
            for &f in factors {
                fields.f32(f);
            }
        }
    }
    fields.bool(*rope_interleaved);
    fields.usize(*context_length);
    fields.bool(*tied_embeddings);
    fields.0
}

impl fmt::Display for TrunkFingerprint {
    /// `layers 2..28 of 30, sha256 1a2b3c4d5e6f…`: enough to tell two trunks apart in a message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "layers {}..{} of {}, sha256 {}",
            self.layers.start,
            self.layers.end,
            self.model_layers,
            &self.hex()[..16]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LlamaConfig {
        LlamaConfig {
            architecture: "llama".into(),
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            rope_scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
            rope_interleaved: true,
            context_length: 8192,
            tied_embeddings: true,
        }
    }

    fn tensors() -> Vec<TensorRecord> {
        vec![TensorRecord {
            name: "blk.2.attn_q.weight".into(),
            shape: vec![576, 576],
            dtype: "q4_1".into(),
            bytes: 4,
        }]
    }

    fn sha(config: &LlamaConfig) -> [u8; 32] {
        digest(&(2..28), config, &tensors(), |_| Ok(vec![1, 2, 3, 4])).expect("digest")
    }

    #[test]
    fn the_config_is_hashed_in_the_documented_layout() {
        let mut expected = Vec::new();
        expected.extend_from_slice(&5u64.to_le_bytes());
        expected.extend_from_slice(b"llama");
        for n in [49152u64, 576, 1536, 30, 9, 3, 64] {
            expected.extend_from_slice(&n.to_le_bytes());
        }
        expected.extend_from_slice(&1e-5f64.to_le_bytes());
        expected.extend_from_slice(&100_000f32.to_le_bytes());
        expected.push(2);
        for f in [8f32, 1.0, 4.0] {
            expected.extend_from_slice(&f.to_le_bytes());
        }
        expected.extend_from_slice(&8192u64.to_le_bytes());
        expected.push(1);
        expected.extend_from_slice(&8192u64.to_le_bytes());
        expected.push(1);
        assert_eq!(config_bytes(&config()), expected);
    }

    #[test]
    fn equal_configs_agree_and_any_changed_field_changes_the_fingerprint() {
        let (one, other) = (config(), config());
        assert_eq!(sha(&one), sha(&other));
        type Change = fn(&mut LlamaConfig);
        let changes: Vec<(&str, Change)> = vec![
            ("architecture", |c| c.architecture = "mistral".into()),
            ("vocab_size", |c| c.vocab_size += 1),
            ("hidden_size", |c| c.hidden_size += 1),
            ("intermediate_size", |c| c.intermediate_size += 1),
            ("num_layers", |c| c.num_layers += 1),
            ("num_heads", |c| c.num_heads += 1),
            ("num_kv_heads", |c| c.num_kv_heads += 1),
            ("head_dim", |c| c.head_dim += 1),
            ("rms_norm_eps", |c| c.rms_norm_eps = 1e-6),
            ("rope_theta", |c| c.rope_theta = 10_000.0),
            ("rope_scaling none", |c| c.rope_scaling = RopeScaling::None),
            ("rope_scaling linear", |c| {
                c.rope_scaling = RopeScaling::Linear { factor: 8.0 }
            }),
            ("rope_scaling factors", |c| {
                c.rope_scaling = RopeScaling::Factors(vec![8.0, 1.0, 4.0])
            }),
            ("llama3 original context", |c| {
                c.rope_scaling = RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 4096,
                }
            }),
            ("rope_interleaved", |c| c.rope_interleaved = false),
            ("context_length", |c| c.context_length = 4096),
            ("tied_embeddings", |c| c.tied_embeddings = false),
        ];
        let mut seen = vec![sha(&config())];
        for (field, change) in changes {
            let mut changed = config();
            change(&mut changed);
            let digest = sha(&changed);
            assert!(
                !seen.contains(&digest),
                "changing {field} gave a fingerprint seen before"
            );
            seen.push(digest);
        }
    }

    #[test]
    fn an_adapter_is_hashed_in_the_documented_layout() {
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let model = ModelSource::open(&data.join("tiny-llama-hf")).expect("model");
        let dir = data.join("lora-head-tail");
        let adapter = Adapter::open(&dir, model.config(), model.format()).expect("adapter");
        let file = dir.join("adapter_model.safetensors");
        let tensors =
            candle_core::safetensors::load(file, &candle_core::Device::Cpu).expect("load");
        let base = TrunkFingerprint {
            layers: 1..4,
            model_layers: 4,
            hidden_size: 64,
            sha256: [7; 32],
        };

        let mut expected = Vec::new();
        let mut push = |bytes: &[u8]| expected.extend_from_slice(bytes);
        push(&23u64.to_le_bytes());
        push(b"lsplit trunk adapter v1");
        push(&[7; 32]);
        push(&7u64.to_le_bytes());
        let modules = [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ];
        for path in modules {
            let module = path.rsplit('.').next().expect("module");
            push(&3u64.to_le_bytes());
            push(&(module.len() as u64).to_le_bytes());
            push(module.as_bytes());
            push(&2f64.to_le_bytes());
            for half in ["A", "B"] {
                let name = format!("base_model.model.model.layers.3.{path}.lora_{half}.weight");
                let values: Vec<f32> = tensors[&name]
                    .flatten_all()
                    .expect("flat")
                    .to_vec1()
                    .expect("values");
                push(&(values.len() as u64).to_le_bytes());
                for v in values {
                    push(&v.to_le_bytes());
                }
            }
        }
        let adapted = base.clone().with_adapter(&adapter).expect("fingerprint");
        assert_eq!(adapted.sha256, <[u8; 32]>::from(Sha256::digest(&expected)));
        assert_eq!((adapted.layers, adapted.model_layers), (1..4, 4));
        let untouched = TrunkFingerprint {
            layers: 1..3,
            ..base
        };
        assert_eq!(
            untouched.clone().with_adapter(&adapter).expect("fp"),
            untouched
        );
    }

    #[test]
    fn layers_names_shapes_types_and_bytes_all_count() {
        let base = sha(&config());
        let with = |layers: Range<usize>, records: Vec<TensorRecord>, bytes: Vec<u8>| {
            digest(&layers, &config(), &records, |_| Ok(bytes.clone())).expect("digest")
        };
        assert_eq!(with(2..28, tensors(), vec![1, 2, 3, 4]), base);
        assert_ne!(with(2..27, tensors(), vec![1, 2, 3, 4]), base);
        assert_ne!(with(2..28, tensors(), vec![1, 2, 3, 5]), base);
        let mut renamed = tensors();
        renamed[0].name = "blk.3.attn_q.weight".into();
        assert_ne!(with(2..28, renamed, vec![1, 2, 3, 4]), base);
        let mut reshaped = tensors();
        reshaped[0].shape = vec![576 * 576];
        assert_ne!(with(2..28, reshaped, vec![1, 2, 3, 4]), base);
        let mut retyped = tensors();
        retyped[0].dtype = "q4_0".into();
        assert_ne!(with(2..28, retyped, vec![1, 2, 3, 4]), base);
        assert_ne!(with(2..28, Vec::new(), Vec::new()), base);
    }
}
