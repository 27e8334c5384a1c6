//! Synthetic llama GGUF files for the tests: seeded random weights, any tensor type candle can
//! quantize, tied or untied LM head, and hooks to break them on purpose.

#![allow(dead_code)]

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use lsplit_model::{KvCache, ModelPart, ModelSource, PartSpec, SplitPlan};

/// Shape of the synthetic models: big enough for K-quants' 256-value blocks, small enough to
/// quantize and run in milliseconds.
pub const VOCAB: usize = 512;
pub const HIDDEN: usize = 256;
pub const FFN: usize = 512;
pub const LAYERS: usize = 4;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = HIDDEN / HEADS;
pub const CONTEXT: usize = 512;

/// A fixed prompt of token ids, all below [`VOCAB`].
pub const PROMPT: [u32; 7] = [1, 17, 300, 42, 511, 99, 5];

/// SplitMix64: a tiny seeded generator so the weights are the same on every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// The tensors and metadata of a GGUF file before it is written, so that a test can remove,
/// replace or add entries.
pub struct GgufModel {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<(String, QTensor)>,
}

fn random(rng: &mut Rng, shape: &[usize], scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| scale * rng.unit()).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor")
}

fn norm(rng: &mut Rng, n: usize) -> QTensor {
    let values: Vec<f32> = (0..n).map(|_| 1.0 + 0.1 * rng.unit()).collect();
    let t = Tensor::from_vec(values, n, &Device::Cpu).expect("tensor");
    QTensor::quantize(&t, GgmlDType::F32).expect("f32 norm")
}

/// The llama metadata of the synthetic shape.
pub fn metadata() -> Vec<(String, Value)> {
    let u = |v: usize| Value::U32(v as u32);
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.vocab_size".into(), u(VOCAB)),
        ("llama.embedding_length".into(), u(HIDDEN)),
        ("llama.block_count".into(), u(LAYERS)),
        ("llama.feed_forward_length".into(), u(FFN)),
        ("llama.attention.head_count".into(), u(HEADS)),
        ("llama.attention.head_count_kv".into(), u(KV_HEADS)),
        ("llama.rope.dimension_count".into(), u(HEAD_DIM)),
        ("llama.context_length".into(), u(CONTEXT)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
    ]
}

impl GgufModel {
    /// A random llama with matrices stored as `dtype` (norms always f32); `tied` leaves out
    /// `output.weight` so the LM head reuses the embeddings.
    pub fn new(dtype: GgmlDType, tied: bool, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let q = |t: Tensor| QTensor::quantize(&t, dtype).expect("quantize");
        let kv = KV_HEADS * HEAD_DIM;
        let mut tensors = vec![(
            "token_embd.weight".to_string(),
            q(random(&mut rng, &[VOCAB, HIDDEN], 0.15)),
        )];
        for i in 0..LAYERS {
            let mut push = |name: &str, t: QTensor| tensors.push((format!("blk.{i}.{name}"), t));
            push("attn_norm.weight", norm(&mut rng, HIDDEN));
            push(
                "attn_q.weight",
                q(random(&mut rng, &[HIDDEN, HIDDEN], 0.15)),
            );
            push("attn_k.weight", q(random(&mut rng, &[kv, HIDDEN], 0.15)));
            push("attn_v.weight", q(random(&mut rng, &[kv, HIDDEN], 0.15)));
            push(
                "attn_output.weight",
                q(random(&mut rng, &[HIDDEN, HIDDEN], 0.15)),
            );
            push("ffn_norm.weight", norm(&mut rng, HIDDEN));
            push("ffn_gate.weight", q(random(&mut rng, &[FFN, HIDDEN], 0.15)));
            push("ffn_up.weight", q(random(&mut rng, &[FFN, HIDDEN], 0.15)));
            push("ffn_down.weight", q(random(&mut rng, &[HIDDEN, FFN], 0.15)));
        }
        tensors.push(("output_norm.weight".into(), norm(&mut rng, HIDDEN)));
        if !tied {
            tensors.push((
                "output.weight".into(),
                q(random(&mut rng, &[VOCAB, HIDDEN], 0.15)),
            ));
        }
        Self {
            metadata: metadata(),
            tensors,
        }
    }

    /// Sets (or adds) a metadata key.
    pub fn set_metadata(&mut self, key: &str, value: Value) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    /// Removes a tensor, which must exist.
    pub fn remove_tensor(&mut self, name: &str) {
        let before = self.tensors.len();
        self.tensors.retain(|(n, _)| n != name);
        assert_eq!(self.tensors.len() + 1, before, "no tensor `{name}`");
    }

    /// Replaces (or adds) a tensor.
    pub fn set_tensor(&mut self, name: &str, tensor: QTensor) {
        match self.tensors.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = tensor,
            None => self.tensors.push((name.to_string(), tensor)),
        }
    }

    /// Writes the GGUF file.
    pub fn write(&self, path: &Path) {
        let metadata: Vec<(&str, &Value)> =
            self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> =
            self.tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let mut file = std::fs::File::create(path).expect("create GGUF");
        gguf_file::write(&mut file, &metadata, &tensors).expect("write GGUF");
    }
}

/// An f32 matrix as a QTensor of the given type.
pub fn qtensor(values: Vec<f32>, shape: &[usize], dtype: GgmlDType) -> QTensor {
    let t = Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor");
    QTensor::quantize(&t, dtype).expect("quantize")
}

/// Index of the largest value (first one on ties).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Logits of a whole part after `tokens`, continuing its cache.
pub fn whole_step(part: &ModelPart, cache: &mut KvCache, tokens: &[u32]) -> Vec<f32> {
    let start = cache.len();
    let hidden = part
        .forward(&part.embed(tokens).expect("embed"), start, cache)
        .expect("forward");
    part.logits(&hidden)
        .expect("logits")
        .to_vec1()
        .expect("to_vec1")
}

/// Greedy decoding with our whole model: `steps` tokens after `prompt`, and the logits of each
/// step (prefill first).
pub fn ours_greedy(
    source: &ModelSource,
    prompt: &[u32],
    steps: usize,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    ours_decode(source, prompt, steps, None)
}

/// Our whole model fed `prompt` then `tokens` (teacher forcing): every step's logits.
pub fn ours_forced(source: &ModelSource, prompt: &[u32], tokens: &[u32]) -> Vec<Vec<f32>> {
    ours_decode(source, prompt, tokens.len(), Some(tokens)).1
}

fn ours_decode(
    source: &ModelSource,
    prompt: &[u32],
    steps: usize,
    forced: Option<&[u32]>,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let part = source
        .load_part(&PartSpec::whole(source.config().num_layers), &Device::Cpu)
        .expect("load whole model");
    let mut cache = part.new_cache();
    decode(prompt, steps, forced, |tokens| {
        whole_step(&part, &mut cache, tokens)
    })
}

/// The same greedy decoding with candle-transformers' quantized llama on the same GGUF file.
pub fn candle_greedy(path: &Path, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    candle_decode(path, prompt, steps, None)
}

fn candle_decode(
    path: &Path,
    prompt: &[u32],
    steps: usize,
    forced: Option<&[u32]>,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut reader = BufReader::new(File::open(path).expect("open"));
    let content = gguf_file::Content::read(&mut reader).expect("read GGUF");
    let mut model =
        ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).expect("candle model");
    let mut position = 0;
    decode(prompt, steps, forced, |tokens| {
        let x = Tensor::new(tokens, &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("input");
        let logits = model
            .forward(&x, position)
            .and_then(|l| l.squeeze(0))
            .and_then(|l| l.to_vec1())
            .expect("candle forward");
        position += tokens.len();
        logits
    })
}

/// Feeds `prompt`, then each next token (the greedy choice, or `forced`'s when given), to
/// `step`; returns the tokens and every step's logits (no step is run for the last token).
fn decode(
    prompt: &[u32],
    steps: usize,
    forced: Option<&[u32]>,
    mut step: impl FnMut(&[u32]) -> Vec<f32>,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut logits = vec![step(prompt)];
    let mut tokens = Vec::new();
    for i in 0..steps {
        let next = forced.map_or_else(|| argmax(logits.last().expect("logits")), |f| f[i]);
        tokens.push(next);
        if tokens.len() < steps {
            logits.push(step(&[next]));
        }
    }
    (tokens, logits)
}

/// Runs `source` split at each `(k1, k2)` of `splits` over `prompt`, then over `tokens` one at
/// a time, and asserts that every step's logits equal `expected`'s (the unsplit run's, prefill
/// first) bit for bit.
pub fn assert_splits_exact(
    source: &ModelSource,
    splits: &[(usize, usize)],
    prompt: &[u32],
    tokens: &[u32],
    expected: &[Vec<f32>],
    label: &str,
) {
    let layers = source.config().num_layers;
    for &(k1, k2) in splits {
        let plan = SplitPlan::new(k1, k2, layers).expect("plan");
        let load = |spec: PartSpec| source.load_part(&spec, &Device::Cpu).expect("load part");
        let (head, trunk, tail) = (load(plan.head()), load(plan.trunk()), load(plan.tail()));
        let mut run = SplitRun::new(&head, &trunk, &tail);
        let mut split_logits = run.step(prompt);
        for (step, expected) in expected.iter().enumerate() {
            assert!(
                bits(&split_logits) == bits(expected),
                "{label}: split {plan} differs from the unsplit model at step {step}"
            );
            if step < tokens.len() {
                split_logits = run.step(&[tokens[step]]);
            }
        }
    }
}

/// A split run as three parts, each with its own cache, passing hidden rows as f32 tensors.
pub struct SplitRun<'a> {
    pub head: &'a ModelPart,
    pub trunk: &'a ModelPart,
    pub tail: &'a ModelPart,
    pub caches: [KvCache; 3],
}

impl<'a> SplitRun<'a> {
    pub fn new(head: &'a ModelPart, trunk: &'a ModelPart, tail: &'a ModelPart) -> Self {
        let caches = [head.new_cache(), trunk.new_cache(), tail.new_cache()];
        Self {
            head,
            trunk,
            tail,
            caches,
        }
    }

    pub fn step(&mut self, tokens: &[u32]) -> Vec<f32> {
        let start = self.caches[0].len();
        let [h, t, l] = &mut self.caches;
        let x = self.head.embed(tokens).expect("embed");
        let x = self.head.forward(&x, start, h).expect("head forward");
        let x = self.trunk.forward(&x, start, t).expect("trunk forward");
        let x = self.tail.forward(&x, start, l).expect("tail forward");
        self.tail
            .logits(&x)
            .expect("logits")
            .to_vec1()
            .expect("to_vec1")
    }
}

/// Bit patterns of a slice of floats, for exact comparisons that also tell -0.0 from 0.0.
pub fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}
