//! Attacks on a wire capture of a split model: what an eavesdropper who strips TLS, or the
//! cloud operator, can read from the hidden rows with the public weights alone.
//!
//! The attacks, each giving a token guess per position:
//! - **replay**: the downlink rows through the public tail, greedy; it reads the generated
//!   text (position `p`'s row predicts token `p + 1`);
//! - **vocabulary matching**: at each position, candidate tokens are run through the public
//!   head after the already recovered prefix, and the one whose row is nearest the uplink row
//!   wins (the argmin over the candidates tried; by default the budget is the whole
//!   vocabulary). Candidates are tried in the order of rankings merged: the public whole
//!   model's next-token prediction after the recovered prefix (text is predictable, so the true
//!   token is usually among the first few), the nearness of each token's row in a table made by
//!   running the whole vocabulary through the head once after a one-token context, and the
//!   logit lens. They go through the head in growing chunks; trying stops early, for speed
//!   only, once a candidate reproduces the row (within
//!   [`MATCH_TOLERANCE`], or within [`LOOSE_TOLERANCE`] with every other token tried
//!   [`SEPARATION`] times farther): [`Options::exhaustive`] turns the early exit off, and tests
//!   check that it changes no guess;
//! - **downlink inversion**: vocabulary matching on the downlink rows, the candidates run
//!   through the public layers below K2 (the head and trunk together) after the recovered
//!   prefix. Unlike replay, which reads the next token, it reads the prompt too. Candidates
//!   are ranked by the public model's prediction after the recovered prefix, then by id; each
//!   costs K2 layers (the uplink's cost K1), so a budget matters more here;
//! - **known plaintext**: vocabulary matching through a linear map learned by ridge
//!   regression from the positions whose tokens are public (the chat template's opening) and
//!   then from each position recovered (see `plaintext.rs`); it sees through a fixed linear
//!   distortion of the rows. It needs K1;
//! - **learned decoder**: an MLP the attacker trains on rows it makes itself, with the public
//!   head and with adapters and noise of its own, maps each uplink row to a token (see
//!   `decoder.rs`); it runs when [`Attacker::train_decoder`] trained one for the boundaries;
//! - **logit lens**: the uplink row through the public final norm and LM head (with tied
//!   embeddings, the nearest embedding by dot product), the baseline. Rows are unpermuted
//!   first once matching has recovered the permutation.
//!
//! Unknown split points (a random policy) are handled by trying every boundary up to a depth
//! and keeping the nearest candidate. Permuted rows are also matched on their sorted values,
//! which a permutation leaves unchanged; the first reproduced row then gives the permutation
//! itself, and the attacks go on unpermuted.
//!
//! Every attack reads only the capture, the public weights and what [`Knowledge`] says;
//! [`Recovery::score`] then scores the guesses against the session's true tokens ([`Truth`]);
//! [`table`] runs the experiments of PRIVACY.md over a grid of splits and over the defences
//! ([`adapter`] writes the private adapter they use).

pub mod adapter;
mod decoder;
mod matching;
mod plaintext;
mod score;
pub mod table;

use std::ops::Range;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use lsplit_model::{ModelError, ModelPart, ModelSource, PartKind, PartSpec};
use lsplit_split::{CaptureError, CapturedMessage, PolicyError, SplitError, Way};
use lsplit_wire::WireError;

pub use decoder::{CORPUS, DEFAULT_DECODER_STEPS, DecoderOptions, corpus_tokens};
pub use matching::{LOOSE_TOLERANCE, MATCH_TOLERANCE, SEPARATION};
use matching::{Matched, Mode, Search, TokenRows};
use plaintext::Ridge;
pub use score::{DraftScores, Rate, Scores, Truth};

/// Errors of an attack.
#[derive(Debug, thiserror::Error)]
pub enum AttackError {
    /// Loading or running the public weights failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The chat template could not be applied.
    #[error(transparent)]
    Tokenizer(#[from] lsplit_tokenizer::TokenizerError),
    /// A captured payload does not decode.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The capture does not fit the model or holds nothing to attack.
    #[error("{0}")]
    Capture(String),
    /// Writing or reading a capture failed.
    #[error(transparent)]
    CaptureFile(#[from] CaptureError),
    /// A token file of `lsplit generate --save-tokens` could not be written or read.
    #[error("{path}: {reason}")]
    TruthFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Generating a session to attack failed.
    #[error(transparent)]
    Split(#[from] SplitError),
    /// A split policy of the table's grid is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The table's scratch directory could not be cleared.
    #[error("{path}: {source}")]
    Scratch {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// What the attacker knows of the split points: the handshake of a fixed split announces
/// the trunk's layers; a random policy's draws stay secret, so every boundary is tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Knowledge {
    /// The uplink's layer, when known.
    pub k1: Option<usize>,
    /// The downlink's layer, when known.
    pub k2: Option<usize>,
    /// Deepest boundary tried from either end when a split point is unknown.
    pub max_k: usize,
    /// Most candidate tokens tried per position by vocabulary matching (`usize::MAX`: the
    /// whole vocabulary, which makes matching exact).
    pub budget: usize,
}

/// How hard the attacks try, beyond what is known of the split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Vocabulary matching tries every candidate of the budget at every position, even after
    /// one reproduced the row: the guess is then the argmin over them all. Off, trying stops
    /// at a reproduced row ([`MATCH_TOLERANCE`]), which gives the same guesses much sooner.
    pub exhaustive: bool,
    /// Tokens the attacker knows at the first positions (the chat template's opening, see
    /// [`template_prefix`]): the known-plaintext attack learns its map from them. Empty: that
    /// attack is not run.
    pub known_prefix: Vec<u32>,
    /// Most candidates downlink inversion tries per position. Each costs K2 layers, and
    /// after that many layers the attacker's rows differ from the device's by more than the
    /// early exit's tolerance, so every candidate of this budget is usually tried.
    pub inversion_budget: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            exhaustive: false,
            known_prefix: Vec::new(),
            inversion_budget: DEFAULT_INVERSION_BUDGET,
        }
    }
}

/// [`Options::inversion_budget`] by default: the public model's prediction after the
/// recovered prefix usually ranks the true token among the first few.
pub const DEFAULT_INVERSION_BUDGET: usize = 32;

/// The tokens every chat-templated prompt of `tokenizer` starts with (system prompt
/// included): public knowledge, at known positions. Empty without a chat template.
pub fn template_prefix(tokenizer: &lsplit_tokenizer::Tokenizer) -> Result<Vec<u32>, AttackError> {
    Ok(template_ends(tokenizer)?.0)
}

/// Where the user's own text lies in `prompt`: after the chat template's public opening and
/// before its public closing (the assistant's turn), when the prompt has both; the whole
/// prompt otherwise (a raw prompt). Recovering the template's tokens reveals nothing, so the
/// tables score what an attack reads of the rest.
pub fn user_text(
    tokenizer: &lsplit_tokenizer::Tokenizer,
    prompt: &[u32],
) -> Result<std::ops::Range<usize>, AttackError> {
    let (opening, closing) = template_ends(tokenizer)?;
    let templated = prompt.len() >= opening.len() + closing.len()
        && prompt.starts_with(&opening)
        && prompt.ends_with(&closing);
    Ok(if templated {
        opening.len()..prompt.len() - closing.len()
    } else {
        0..prompt.len()
    })
}

/// The tokens every chat-templated prompt of `tokenizer` starts with and ends with (the
/// longest runs two different messages share at each end); both empty without a template.
fn template_ends(
    tokenizer: &lsplit_tokenizer::Tokenizer,
) -> Result<(Vec<u32>, Vec<u32>), AttackError> {
    if tokenizer.chat_template().is_none() {
        return Ok((Vec::new(), Vec::new()));
    }
    let (a, b) = (chat_tokens(tokenizer, "a")?, chat_tokens(tokenizer, "b")?);
    let opening = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let closing = a
        .iter()
        .rev()
        .zip(b.iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    Ok((a[..opening].to_vec(), a[a.len() - closing..].to_vec()))
}

/// The tokens a device sends for the user message `text`: chat-templated when the tokenizer
/// has a template, raw otherwise.
pub(crate) fn chat_tokens(
    tokenizer: &lsplit_tokenizer::Tokenizer,
    text: &str,
) -> Result<Vec<u32>, AttackError> {
    if tokenizer.chat_template().is_none() {
        return Ok(tokenizer.encode(text, true)?);
    }
    let messages = [lsplit_tokenizer::ChatMessage::new("user", text)];
    let templated = tokenizer.apply_chat_template(&messages, true)?;
    Ok(tokenizer.encode(&templated, false)?)
}

/// The attacks' guesses, per sequence position that crossed the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Replay: the token guessed to follow each position.
    pub replay_next: Vec<u32>,
    /// The downlink layer replay read each position at (the most confident one).
    pub replay_k2: Vec<usize>,
    /// Vocabulary matching: the token guessed at each position.
    pub matching: Vec<u32>,
    /// Positions whose uplink row a candidate matched (see [`Candidate::matches`]).
    pub exact_matches: usize,
    /// Logit lens: the token guessed at each position.
    pub lens: Vec<u32>,
    /// True when the rows were permuted and matching recovered the permutation.
    pub permutation_recovered: bool,
    /// Downlink inversion: the token guessed at each position from its downlink row.
    pub inversion: Vec<u32>,
    /// Positions whose downlink row a candidate reproduced.
    pub inverted_exactly: usize,
    /// The known-plaintext attack: the token guessed at each position (empty when it was
    /// not run: no known prefix, or a secret K1).
    pub known_plaintext: Vec<u32>,
    /// The learned decoder: the token guessed at each position (empty when no decoder was
    /// trained for the boundaries the uplink may have left from).
    pub decoder: Vec<u32>,
    /// The uplink attacks on the rows a later step rewound (rejected drafts).
    pub rejected: Rejected,
}

/// The uplink attacks on the rows that later steps rewound: drafted tokens the device
/// rejected, whose rows crossed all the same. Each run of them is matched after the tokens
/// recovered before it, as the kept rows are; every list is in the order the rows crossed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rejected {
    /// The sequence position of each rewound row.
    pub positions: Vec<usize>,
    /// Vocabulary matching: the token guessed for each.
    pub matching: Vec<u32>,
    /// Rows a candidate matched (see [`MATCH_TOLERANCE`]).
    pub exact_matches: usize,
    /// Logit lens: the token guessed for each.
    pub lens: Vec<u32>,
    /// The known-plaintext attack, through the map learnt from the kept rows (empty when it
    /// was not run).
    pub known_plaintext: Vec<u32>,
    /// The learned decoder (empty when none was trained).
    pub decoder: Vec<u32>,
}

/// The public weights an attacker runs: a head as deep as the deepest boundary tried, a tail
/// from the shallowest, and the embedding table.
pub struct Attacker {
    head: ModelPart,
    tail: ModelPart,
    /// The whole public model: its next-token prediction after the recovered prefix ranks
    /// the candidates of the next position.
    whole: ModelPart,
    /// Every token's row at each boundary `k` (`tables[0]` the embeddings), computed once
    /// after a one-token context: the order candidates are tried in.
    tables: Vec<TokenRows>,
    layers: usize,
    max_k: usize,
    /// The public model's file, which the decoder's training reopens with adapters of its own.
    path: PathBuf,
    /// The learned decoders trained so far, one per set of boundaries.
    decoders: Vec<decoder::Decoder>,
}

impl Attacker {
    /// Loads the parts of `source` that boundaries up to `max_k` from either end need, and
    /// runs the whole vocabulary through the head once (after the token `context`) to rank
    /// candidates later; `progress` is told the tokens done and the total.
    pub fn new(
        source: &ModelSource,
        max_k: usize,
        context: u32,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, AttackError> {
        let layers = source.config().num_layers;
        let max_k = max_k.min(layers);
        let head = source.load_part(
            &PartSpec {
                kind: PartKind::Head,
                layers: 0..max_k,
            },
            device,
        )?;
        let tail = source.load_part(
            &PartSpec {
                kind: PartKind::Tail,
                layers: layers - max_k..layers,
            },
            device,
        )?;
        let whole = source.load_part(&PartSpec::whole(layers), device)?;
        let tables = matching::vocabulary_tables(
            &head,
            source.config().vocab_size,
            max_k,
            context,
            progress,
        )?;
        Ok(Self {
            head,
            tail,
            whole,
            tables,
            layers,
            max_k,
            path: source.path().to_path_buf(),
            decoders: Vec::new(),
        })
    }

    /// Every token's embedding `(vocab, d)`.
    fn embeddings(&self) -> &Tensor {
        self.tables[0].rows()
    }

    /// The boundaries the uplink may have left from: K1 when known, else every one up to
    /// `max_k`.
    fn uplink_boundaries(&self, knowledge: &Knowledge) -> Result<Range<usize>, AttackError> {
        match knowledge.k1 {
            Some(k) if k <= self.max_k => Ok(k..k + 1),
            Some(k) => Err(AttackError::Capture(format!(
                "K1 = {k} is deeper than the attack's --max-k {}",
                self.max_k
            ))),
            None => Ok(0..knowledge.max_k.min(self.max_k) + 1),
        }
    }

    /// Runs every attack on the messages of one capture, with the default [`Options`].
    pub fn run(
        &self,
        messages: &[CapturedMessage],
        knowledge: &Knowledge,
    ) -> Result<Recovery, AttackError> {
        self.run_with(messages, knowledge, &Options::default())
    }

    /// Runs every attack on the messages of one capture. It reads nothing but `messages`, the
    /// public weights and `knowledge`: the true tokens only ever score the result.
    pub fn run_with(
        &self,
        messages: &[CapturedMessage],
        knowledge: &Knowledge,
        options: &Options,
    ) -> Result<Recovery, AttackError> {
        let Crossed { kept: up, rewound } = crossed(messages, Way::Up, self.head.device())?;
        let down = crossed(messages, Way::Down, self.head.device())?.kept;
        if up.is_empty() || up.len() != down.len() {
            return Err(AttackError::Capture(format!(
                "the capture holds {} uplink and {} downlink positions",
                up.len(),
                down.len()
            )));
        }
        let width = self.head.config().hidden_size;
        if up[0].dims() != [width] {
            return Err(AttackError::Capture(format!(
                "captured rows are {:?} wide but the model's hidden size is {width}",
                up[0].dims()
            )));
        }
        let boundaries = self.uplink_boundaries(knowledge)?;
        let search = Search {
            part: &self.head,
            boundaries: boundaries.clone(),
            tables: true,
            budget: knowledge.budget,
            exhaustive: options.exhaustive,
            known: &[],
            prefix: &[],
            ridge: None,
        };
        let matched = self.vocabulary_matching(&up, &search, Mode::Unknown)?;
        let fresh = Ridge::default();
        let plaintext = match (&options.known_prefix[..], knowledge.k1) {
            ([], _) | (_, None) => None,
            (known, Some(k)) => {
                let search = Search {
                    boundaries: k..k + 1,
                    known,
                    ridge: Some(&fresh),
                    ..search
                };
                Some((self.vocabulary_matching(&up, &search, Mode::Plain)?, search))
            }
        };
        let unpermute = |rows: &[Tensor]| -> Result<Vec<Tensor>, AttackError> {
            rows.iter().map(|row| matched.mode.unpermute(row)).collect()
        };
        let unpermuted = unpermute(&up)?;
        let decoder = self.decode(&unpermuted, &boundaries)?;
        let lens = self.logit_lens(&unpermuted)?;
        let rewound = rewound
            .iter()
            .map(|(start, rows)| Ok((*start, unpermute(rows)?)))
            .collect::<Result<Vec<_>, AttackError>>()?;
        let rejected = self.rejected(
            &rewound,
            (&matched, &search),
            plaintext.as_ref().map(|(m, s)| (m, s)),
            &boundaries,
        )?;
        let down = unpermute(&down)?;
        let k2s = match knowledge.k2 {
            Some(k) if k + self.max_k >= self.layers => k..k + 1,
            Some(k) => {
                return Err(AttackError::Capture(format!(
                    "K2 = {k} leaves more tail layers than the attack's --max-k {}",
                    self.max_k
                )));
            }
            None => self.layers - knowledge.max_k.min(self.max_k)..self.layers + 1,
        };
        let (replay_k2, replay_next) = self.replay(&down, k2s.clone())?;
        let inversion = Search {
            part: &self.whole,
            boundaries: k2s,
            tables: false,
            budget: options.inversion_budget,
            exhaustive: options.exhaustive,
            known: &[],
            prefix: &[],
            ridge: None,
        };
        // The downlink rows are already unpermuted when the uplink gave the permutation away.
        let down_mode = match matched.mode {
            Mode::Unknown => Mode::Unknown,
            Mode::Plain | Mode::Permuted(_) => Mode::Plain,
        };
        let inverted = self.vocabulary_matching(&down, &inversion, down_mode)?;
        Ok(Recovery {
            replay_next,
            replay_k2,
            matching: matched.tokens,
            exact_matches: matched.exact,
            lens,
            permutation_recovered: matches!(matched.mode, Mode::Permuted(_)),
            inversion: inverted.tokens,
            inverted_exactly: inverted.exact,
            known_plaintext: plaintext.map(|(m, _)| m.tokens).unwrap_or_default(),
            decoder,
            rejected,
        })
    }

    /// The uplink attacks on the rewound runs `(first position, rows)` (unpermuted): each run
    /// matched after the tokens recovered before it, by plain matching and through the
    /// known-plaintext map at its end (`plaintext`, when that attack ran), and every row
    /// through the logit lens and the learned decoder.
    fn rejected(
        &self,
        runs: &[(usize, Vec<Tensor>)],
        (matched, search): (&Matched, &Search),
        plaintext: Option<(&Matched, &Search)>,
        boundaries: &Range<usize>,
    ) -> Result<Rejected, AttackError> {
        let mut rejected = Rejected::default();
        if runs.is_empty() {
            return Ok(rejected);
        }
        // The permutation, when there was one, is undone already.
        let mode = match matched.mode {
            Mode::Unknown => Mode::Unknown,
            Mode::Plain | Mode::Permuted(_) => Mode::Plain,
        };
        for (start, rows) in runs {
            rejected.positions.extend(*start..start + rows.len());
            let prefix = matched.tokens.get(..*start).ok_or_else(|| {
                AttackError::Capture(format!(
                    "rows rewound from position {start}, past the {} positions kept",
                    matched.tokens.len()
                ))
            })?;
            let search = Search {
                prefix,
                boundaries: search.boundaries.clone(),
                ..*search
            };
            let run = self.vocabulary_matching(rows, &search, mode.clone())?;
            rejected.matching.extend(run.tokens);
            rejected.exact_matches += run.exact;
            if let Some((known, search)) = plaintext {
                let search = Search {
                    prefix: &known.tokens[..*start],
                    ridge: Some(&known.ridge),
                    boundaries: search.boundaries.clone(),
                    ..*search
                };
                let run = self.vocabulary_matching(rows, &search, Mode::Plain)?;
                rejected.known_plaintext.extend(run.tokens);
            }
        }
        let rows = runs.iter().flat_map(|(_, rows)| rows.iter().cloned());
        let rows: Vec<Tensor> = rows.collect();
        rejected.lens = self.logit_lens(&rows)?;
        rejected.decoder = self.decode(&rows, boundaries)?;
        Ok(rejected)
    }

    /// The logit lens: each uplink row (unpermuted once matching has recovered the
    /// permutation) through the public final norm and LM head; its most likely token.
    fn logit_lens(&self, rows: &[Tensor]) -> Result<Vec<u32>, AttackError> {
        let logits = self.tail.row_logits(&Tensor::stack(rows, 0)?)?;
        Ok(logits.argmax(1)?.to_vec1::<u32>()?)
    }

    /// Runs the downlink rows through the tail from each candidate boundary and keeps, per
    /// position, the boundary the model is most confident at (a random policy draws K2 per
    /// step; the prefix's keys then come from rows at the same boundary, close enough for
    /// greedy decoding).
    fn replay(
        &self,
        down: &[Tensor],
        k2s: Range<usize>,
    ) -> Result<(Vec<usize>, Vec<u32>), AttackError> {
        let rows = Tensor::stack(down, 0)?;
        let mut best: Vec<(f32, usize, u32)> = vec![(f32::NEG_INFINITY, 0, 0); down.len()];
        for k2 in k2s {
            let mut cache = self.tail.new_cache();
            let out = self
                .tail
                .forward_layers(&rows, 0, k2..self.layers, &mut cache)?;
            for (p, best) in best.iter_mut().enumerate() {
                let logits = self.tail.logits(&out.narrow(0, p, 1)?)?.to_vec1::<f32>()?;
                let (token, p_max) = most_likely(&logits);
                if p_max > best.0 {
                    *best = (p_max, k2, token);
                }
            }
        }
        Ok(best.into_iter().map(|(_, k2, token)| (k2, token)).unzip())
    }
}

/// The rows that went one way, read along the rewinds.
struct Crossed {
    /// The row of each position that its kept token sent, in position order.
    kept: Vec<Tensor>,
    /// The runs of rows a later step rewound (rejected drafts), in the order they crossed:
    /// each run's first position and its rows.
    rewound: Vec<(usize, Vec<Tensor>)>,
}

/// The rows going `way`: a position's first row is the one its own step sent (later ones at
/// the same position are catch-up copies at other layers), unless a later step rewound it (a
/// rejected draft, kept apart), when the step after the rewind sends it again.
fn crossed(
    messages: &[CapturedMessage],
    way: Way,
    device: &Device,
) -> Result<Crossed, AttackError> {
    // A downlink answers the uplink of its step, whose rewind it follows.
    let rewinds: std::collections::HashMap<u64, usize> = messages
        .iter()
        .filter(|m| m.direction == Way::Up && m.rewind > 0)
        .map(|m| (m.step, m.rewind))
        .collect();
    let mut rows: Vec<Tensor> = Vec::new();
    let mut rewound = Vec::new();
    for message in messages.iter().filter(|m| m.direction == way) {
        let rewind = rewinds.get(&message.step).copied().unwrap_or(0);
        let kept = rows.len().checked_sub(rewind).ok_or_else(|| {
            AttackError::Capture(format!(
                "step {} rewinds {rewind} positions but only {} crossed",
                message.step,
                rows.len()
            ))
        })?;
        let taken = rows.split_off(kept);
        if !taken.is_empty() {
            rewound.push((kept, taken));
        }
        let r = &message.rows;
        if r.start + r.rows <= rows.len() {
            continue;
        }
        if r.start > rows.len() {
            return Err(AttackError::Capture(format!(
                "a {way:?} message starts at position {} but positions up to {} never crossed",
                r.start,
                rows.len()
            )));
        }
        let decoded = r.decode(device)?;
        for p in rows.len()..r.start + r.rows {
            rows.push(decoded.get(p - r.start)?);
        }
    }
    Ok(Crossed {
        kept: rows,
        rewound,
    })
}

/// The most likely token of `logits` and its probability.
fn most_likely(logits: &[f32]) -> (u32, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let best = logits
        .iter()
        .enumerate()
        .fold(0, |best, (i, l)| if *l > logits[best] { i } else { best });
    (best as u32, 1.0 / total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_likely_token_and_its_probability() {
        let (token, p) = most_likely(&[0.0, 2.0f32.ln(), 0.0]);
        assert_eq!(token, 1);
        assert!((p - 0.5).abs() < 1e-6);
    }
}
