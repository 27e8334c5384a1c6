//! The learned inversion decoder (after Cunningham et al. 2026): a one-hidden-layer MLP that
//! maps an uplink row to its token. The attacker trains it on rows it makes itself: its own
//! public text ([`CORPUS`], none of the table's prompts) run through the public head, and
//! through heads with private adapters it draws itself (it lacks the device's), with the
//! uplink noise levels added, so that the decoder learns what survives those defences. It
//! reads nothing of a session but the capture; the same seed gives the same decoder.
//!
//! The MLP's output is compared with every token's embedding (a softmax over dot products,
//! trained on the batch's tokens and sampled others): it names any token of the vocabulary,
//! not only those of the corpus, at the cost of a small output layer.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{D, DType, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use lsplit_model::{ModelPart, ModelSource, PartKind, PartSpec};
use lsplit_split::{UplinkNoise, add_noise};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::StandardNormal;

use crate::adapter::write_random_adapter;
use crate::{AttackError, Attacker, Knowledge};

/// The attacker's own public text: everyday requests with numbers and names, none of them a
/// prompt of the table.
pub const CORPUS: [&str; 24] = [
    "Tell me a fun fact about octopuses.",
    "My account number is 88231 and my password hint is Biscuit. Keep them safe.",
    "How long should I boil an egg?",
    "Write a limerick about a cat who loves the rain.",
    "Call Maria Lopez at 555-0199 on Friday at 10 am about the lease.",
    "What is the difference between weather and climate?",
    "Give me three tips for a job interview.",
    "I was born on July 14, 1987 in Lyon. What day of the week was that?",
    "Explain how a bicycle gear works.",
    "Convert 72 degrees Fahrenheit to Celsius.",
    "Write a JavaScript function that sums an array of numbers.",
    "My son Kenji has a fever of 39 degrees. What should I do?",
    "Suggest a name for a small bakery in Boston.",
    "What causes earthquakes?",
    "Our team missed the deadline by two weeks. Draft an apology to the client.",
    "How many planets are in the solar system?",
    "Describe a sunset over the mountains in three sentences.",
    "My credit card ending in 3340 was charged twice. How do I dispute it?",
    "What is photosynthesis?",
    "Plan a three day trip to Rome for two people on a budget of 900 euros.",
    "Why do leaves change color in the fall?",
    "Write a short poem about friendship.",
    "The meeting with Mr. Haddad moved to room 402 at 3:30 pm. Tell the team.",
    "How do vaccines train the immune system?",
];

/// Steps of training by default: under a minute on two cores in the dev build.
pub const DEFAULT_DECODER_STEPS: usize = 600;

/// How the decoder is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderOptions {
    /// Optimizer steps (0: no decoder).
    pub steps: usize,
    /// Seeds the attacker's adapters, the noise, the batches and the initial weights.
    pub seed: u64,
}

impl Default for DecoderOptions {
    fn default() -> Self {
        Self {
            steps: DEFAULT_DECODER_STEPS,
            seed: 0,
        }
    }
}

/// Adapters the attacker draws to imitate an unknown private one, and their strengths (the
/// update's RMS relative to its input; the product's random adapters are 0.1).
const ADAPTER_STRENGTHS: [f32; 3] = [0.05, 0.1, 0.2];

/// Relative uplink noise levels the training rows get, one drawn per row (none twice as
/// often: the attacker does not know whether the device adds any).
const NOISE_LEVELS: [f32; 6] = [0.0, 0.0, 0.05, 0.1, 0.2, 0.5];

/// Width of the hidden layer.
const HIDDEN: usize = 1024;

/// Rows per optimizer step.
const BATCH: usize = 64;

/// Tokens drawn from the whole vocabulary per step as the softmax's other candidates, beside
/// the batch's own.
const NEGATIVES: usize = 512;

/// The scale of the cosines before the softmax (a temperature of 1/20).
const SCALE: f64 = 20.0;

/// Learning rate of AdamW.
const LEARNING_RATE: f64 = 2e-3;

/// Tells apart the scratch directories of adapters drawn at once in one process.
static SCRATCH: AtomicUsize = AtomicUsize::new(0);

/// The chat-templated tokens of each text of [`CORPUS`], as a device would send them (raw when
/// the tokenizer has no chat template).
pub fn corpus_tokens(
    tokenizer: &lsplit_tokenizer::Tokenizer,
) -> Result<Vec<Vec<u32>>, AttackError> {
    CORPUS
        .iter()
        .map(|text| crate::chat_tokens(tokenizer, text))
        .collect()
}

/// A trained decoder for the rows of some boundaries.
pub(crate) struct Decoder {
    /// The boundaries it was trained on (one when K1 is known).
    pub(crate) boundaries: Range<usize>,
    /// Every token's embedding at unit length `(vocab, d)`, which its outputs are compared with.
    embeddings: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
}

impl Decoder {
    /// The MLP's unit-length output for rows `(n, d)`.
    fn forward(
        rows: &Tensor,
        w1: &Tensor,
        b1: &Tensor,
        w2: &Tensor,
        b2: &Tensor,
    ) -> candle_core::Result<Tensor> {
        // Each row scaled to unit RMS: noise and adapters change a row's length more than its
        // direction.
        let rms = rows.sqr()?.mean_keepdim(1)?.sqrt()?.clamp(1e-6, f64::MAX)?;
        let x = rows.broadcast_div(&rms)?;
        let h = x.matmul(w1)?.broadcast_add(b1)?.gelu()?;
        unit(&h.matmul(w2)?.broadcast_add(b2)?)
    }

    /// The token guessed for each row `(n, d)`: the embedding nearest the MLP's output by
    /// cosine.
    pub(crate) fn guess(&self, rows: &Tensor) -> Result<Vec<u32>, AttackError> {
        let out = Self::forward(rows, &self.w1, &self.b1, &self.w2, &self.b2)?;
        Ok(out
            .matmul(&self.embeddings.t()?)?
            .argmax(1)?
            .to_vec1::<u32>()?)
    }
}

/// Each row of `(n, d)` scaled to unit length.
fn unit(rows: &Tensor) -> candle_core::Result<Tensor> {
    let norm = rows
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-6, f64::MAX)?;
    rows.broadcast_div(&norm)
}

impl Attacker {
    /// Trains the decoder for the uplink rows `knowledge` says to expect (those of K1 when it
    /// is known, of every boundary up to `max_k` when not) on the attacker's own `texts`
    /// (token ids, e.g. [`corpus_tokens`]); nothing to do when one was trained for the same
    /// boundaries. `progress` is told the steps done and the total.
    pub fn train_decoder(
        &mut self,
        texts: &[Vec<u32>],
        knowledge: &Knowledge,
        options: &DecoderOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(), AttackError> {
        let boundaries = self.uplink_boundaries(knowledge)?;
        if options.steps == 0 || self.decoders.iter().any(|d| d.boundaries == boundaries) {
            return Ok(());
        }
        let tokens: usize = texts.iter().map(Vec::len).sum();
        if tokens == 0 {
            return Err(AttackError::Capture(
                "the decoder's training text holds no tokens".into(),
            ));
        }
        let (rows, ids) = self.training_rows(texts, &boundaries, options.seed)?;
        let decoder = self.fit(&rows, &ids, boundaries, options, progress)?;
        self.decoders.push(decoder);
        Ok(())
    }

    /// The decoder's guesses for the uplink rows `up` (unpermuted), if one was trained for
    /// `boundaries`; empty when none was.
    pub(crate) fn decode(
        &self,
        up: &[Tensor],
        boundaries: &Range<usize>,
    ) -> Result<Vec<u32>, AttackError> {
        match self.decoders.iter().find(|d| d.boundaries == *boundaries) {
            Some(decoder) => decoder.guess(&Tensor::stack(up, 0)?),
            None => Ok(Vec::new()),
        }
    }

    /// The rows of every token of `texts` at each of `boundaries`, through the public head and
    /// through heads with adapters drawn from `seed`, flattened `(rows × d)`, and their tokens.
    fn training_rows(
        &self,
        texts: &[Vec<u32>],
        boundaries: &Range<usize>,
        seed: u64,
    ) -> Result<(Vec<f32>, Vec<u32>), AttackError> {
        let deepest = boundaries.end - 1;
        let mut rows = Vec::new();
        let mut ids = Vec::new();
        let mut add = |head: &ModelPart| -> Result<(), AttackError> {
            for text in texts.iter().filter(|t| !t.is_empty()) {
                let embedded = head.embed(text)?;
                for k in boundaries.clone() {
                    let at_k = if k == 0 {
                        embedded.clone()
                    } else {
                        head.forward_layers(&embedded, 0, 0..k, &mut head.new_cache())?
                    };
                    rows.extend(at_k.flatten_all()?.to_vec1::<f32>()?);
                    ids.extend_from_slice(text);
                }
            }
            Ok(())
        };
        add(&self.head)?;
        if deepest > 0 {
            let layers: Vec<usize> = (0..deepest).collect();
            for (i, strength) in ADAPTER_STRENGTHS.into_iter().enumerate() {
                let dir = std::env::temp_dir().join(format!(
                    "lsplit-decoder-{}-{}",
                    std::process::id(),
                    SCRATCH.fetch_add(1, Ordering::Relaxed)
                ));
                let adapter_seed = seed.wrapping_mul(31).wrapping_add(1 + i as u64);
                let mut source = ModelSource::open(&self.path)?;
                source.set_kv_precision(self.head.kv_precision());
                let written =
                    write_random_adapter(&dir, source.config(), &layers, strength, adapter_seed)
                        .and_then(|()| Ok(source.load_adapter(&dir)?));
                std::fs::remove_dir_all(&dir).ok();
                written?;
                let head = source.load_part(
                    &PartSpec {
                        kind: PartKind::Head,
                        layers: 0..deepest,
                    },
                    self.head.device(),
                )?;
                add(&head)?;
            }
        }
        Ok((rows, ids))
    }

    /// Trains the MLP on `rows` (flattened) and their tokens `ids`, noise added per row.
    fn fit(
        &self,
        rows: &[f32],
        ids: &[u32],
        boundaries: Range<usize>,
        options: &DecoderOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Decoder, AttackError> {
        let device = self.head.device();
        let width = self.head.config().hidden_size;
        let vocab = self.head.config().vocab_size;
        let embeddings = unit(self.embeddings())?;
        let mut rng = ChaCha20Rng::seed_from_u64(options.seed);
        let mut normal = |shape: (usize, usize), std: f32| -> Result<Var, AttackError> {
            let values: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| std * rng.sample::<f32, _>(StandardNormal))
                .collect();
            Ok(Var::from_tensor(&Tensor::from_vec(values, shape, device)?)?)
        };
        let w1 = normal((width, HIDDEN), 1.0 / (width as f32).sqrt())?;
        let w2 = normal((HIDDEN, width), 1.0 / (HIDDEN as f32).sqrt())?;
        let b1 = Var::zeros(HIDDEN, DType::F32, device)?;
        let b2 = Var::zeros(width, DType::F32, device)?;
        let mut optimizer = AdamW::new(
            vec![w1.clone(), b1.clone(), w2.clone(), b2.clone()],
            ParamsAdamW {
                lr: LEARNING_RATE,
                weight_decay: 0.0,
                ..ParamsAdamW::default()
            },
        )?;
        let noises: Vec<Option<UplinkNoise>> = NOISE_LEVELS
            .iter()
            .map(|&s| {
                (s > 0.0)
                    .then(|| UplinkNoise::new(s, None, None))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        let mut next = order.len();
        for step in 0..options.steps {
            let mut batch = Vec::with_capacity(BATCH * width);
            let mut tokens = Vec::with_capacity(BATCH);
            for _ in 0..BATCH {
                if next == order.len() {
                    order.shuffle(&mut rng);
                    next = 0;
                }
                let i = order[next];
                next += 1;
                let mut row = rows[i * width..(i + 1) * width].to_vec();
                if let Some(noise) = &noises[rng.random_range(0..noises.len())] {
                    add_noise(&mut row, width, noise, &mut rng);
                }
                batch.extend(row);
                tokens.push(ids[i]);
            }
            // The softmax's candidates: the batch's tokens, then others drawn from the vocabulary.
            let mut candidates: Vec<u32> = tokens.clone();
            candidates.sort_unstable();
            candidates.dedup();
            while candidates.len() < (BATCH + NEGATIVES).min(vocab) {
                let t = rng.random_range(0..vocab as u32);
                if !candidates.contains(&t) {
                    candidates.push(t);
                }
            }
            let labels: Vec<u32> = tokens
                .iter()
                .map(|t| candidates.iter().position(|c| c == t).unwrap_or(0) as u32)
                .collect();
            let x = Tensor::from_vec(batch, (BATCH, width), device)?;
            let targets =
                embeddings.index_select(&Tensor::new(candidates.as_slice(), device)?, 0)?;
            let out = Decoder::forward(&x, &w1, &b1, &w2, &b2)?;
            let logits = (out.matmul(&targets.t()?)? * SCALE)?;
            let loss =
                candle_nn::loss::cross_entropy(&logits, &Tensor::new(labels.as_slice(), device)?)?;
            optimizer.backward_step(&loss)?;
            if step % 100 == 0 {
                tracing::debug!(step, loss = loss.to_scalar::<f32>()?, "decoder");
            }
            progress(step + 1, options.steps);
        }
        Ok(Decoder {
            boundaries,
            embeddings,
            w1: w1.as_tensor().clone(),
            b1: b1.as_tensor().clone(),
            w2: w2.as_tensor().clone(),
            b2: b2.as_tensor().clone(),
        })
    }
}
