use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use lsplit_model::KvCache;

use crate::capture::{CaptureWriter, Way};
use crate::device::Parts;
use crate::draft::DraftCache;
use crate::lookahead::Lookahead;
use crate::sampler::argmax;
use crate::speculate::{Drafter, Source, lookup};
use crate::step::{DeviceState, Exchange};
use crate::{
    DeviceModel, Sampler, SamplingParams, SessionKeys, Speculate, SplitError, Stats, Trunk,
};

/// What a generation is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Stop after this many generated tokens.
    pub max_tokens: usize,
    /// How tokens are chosen.
    pub sampling: SamplingParams,
    /// Keep going through end-of-sequence tokens, fed back like any other token, so that every
    /// run has `max_tokens` tokens (speed and codec measures).
    pub ignore_eos: bool,
    /// Where drafted tokens come from, for steps that check several at once; the output is
    /// the same whatever the source.
    pub speculate: Speculate,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            ignore_eos: false,
            speculate: Speculate::Off,
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The sequence reached the model's context length.
    ContextFull,
    /// The caller's step callback asked to stop (a stop sequence, a client that went away).
    Stopped,
}

/// One generated token, as [`Session::generate_steps`] reports it.
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    /// The token id chosen.
    pub token: u32,
    /// The logits it was chosen from.
    pub logits: &'a [f32],
    /// The text this token completed; empty while a character is still incomplete.
    pub text: &'a str,
    /// Time and bytes of the generation so far; the difference between two steps is the cost
    /// of one token (for the first step, of the prompt pass).
    pub stats: &'a Stats,
}

/// The result of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated token ids (the end-of-sequence token excluded, unless
    /// [`GenerateOptions::ignore_eos`]).
    pub tokens: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// Why generation ended.
    pub stop: StopReason,
    /// Time and bytes.
    pub stats: Stats,
    /// Drafted tokens whose rows crossed but that the sequence did not keep, in the order
    /// they crossed (empty without `--speculate`): what an observer of the wire saw besides
    /// the text, recorded for `lsplit generate --save-tokens`.
    pub rejected: Vec<RejectedDraft>,
}

/// A drafted token that was run (its rows crossed to the trunk and back) but not kept: the
/// choice at its position differed from it or from a draft before it, or generation ended
/// before it was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RejectedDraft {
    /// Its sequence position (the position of its rows on the wire).
    pub position: usize,
    /// The token id the device ran there.
    pub token: u32,
}

/// What a session holds besides its position: the whole model's cache, or the state of a
/// split's one step path.
enum State {
    Unsplit { cache: KvCache },
    Split(Box<DeviceState>),
}

/// One generation session on the device: the KV caches of its parts, its trunk session, and
/// the position reached.
pub struct Session<'m> {
    model: &'m DeviceModel,
    state: State,
    position: usize,
    history: Vec<u32>,
    stats: Stats,
    capture: Option<CaptureWriter>,
    /// The draft model's cache, made at its first draft.
    draft: Option<DraftCache>,
    /// Lookahead decoding's Jacobi iterate and n-gram pool.
    lookahead: Lookahead,
}

/// The last step's drafting: its source, tokens drafted and kept so far, the step's time and
/// the time drafting took.
#[derive(Default)]
struct Window {
    source: Option<Source>,
    drafted: usize,
    kept: usize,
    time: Duration,
    drafting: Duration,
}

impl<'m> Session<'m> {
    pub(crate) fn unsplit(model: &'m DeviceModel) -> Result<Self, SplitError> {
        match &model.parts {
            Parts::Unsplit(whole) => Ok(Self::with_state(
                model,
                State::Unsplit {
                    cache: whole.new_cache(),
                },
            )),
            Parts::Split { .. } => Err(SplitError::Layout("a split model needs a trunk session")),
        }
    }

    pub(crate) fn split(
        model: &'m DeviceModel,
        trunk: Box<dyn Trunk>,
        keys: &SessionKeys,
    ) -> Result<Self, SplitError> {
        let Parts::Split { policy, head, tail } = &model.parts else {
            return Err(SplitError::Layout("an unsplit model takes no trunk"));
        };
        if keys.policy != *policy {
            return Err(SplitError::Layout(
                "the session keys' policy is not the one the model was loaded for",
            ));
        }
        let (needed, held) = (policy.trunk_layers(), trunk.layers());
        // A fixed split's trunk is exactly its layers; a random one's holds at least every
        // layer a draw may give it.
        if policy.is_fixed() && held != needed {
            return Err(SplitError::Layout(
                "the trunk's layers do not match the device's split points",
            ));
        }
        if needed.start < held.start || needed.end > held.end {
            return Err(SplitError::Layout(
                "the trunk does not hold every layer the policy may draw",
            ));
        }
        let noise = model.uplink_noise.map(|n| n.stream());
        let device = DeviceState::new(head.clone(), tail.clone(), trunk, keys, noise)?;
        Ok(Self::with_state(model, State::Split(Box::new(device))))
    }

    fn with_state(model: &'m DeviceModel, state: State) -> Self {
        Self {
            model,
            state,
            position: 0,
            history: Vec::new(),
            stats: Stats::default(),
            capture: None,
            draft: None,
            lookahead: Lookahead::default(),
        }
    }

    /// Records every message that crosses to and from the trunk from now on into `writer`.
    pub fn capture(&mut self, writer: CaptureWriter) {
        self.capture = Some(writer);
    }

    /// Positions processed so far.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Time and bytes so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Runs `tokens` (the prompt in one pass, or one new token) through head, trunk and tail,
    /// and returns the logits for the next token.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SplitError> {
        let mut rows = self.run(tokens, false)?;
        Ok(rows.pop().unwrap_or_default())
    }

    /// Runs `tokens` in one step, as [`Session::forward`] does, and returns the logits after
    /// each of them. After the prompt, a step of up to [`lsplit_model::MAX_STEP_ROWS`] tokens
    /// gives exactly the logits of one-token steps.
    pub fn forward_rows(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, SplitError> {
        self.run(tokens, true)
    }

    /// Forgets the positions from `len` on (drafted tokens that were not kept), in every part:
    /// the trunk forgets them with the next step.
    pub fn rewind(&mut self, len: usize) -> Result<(), SplitError> {
        if len > self.position {
            return Err(SplitError::Layout(
                "a session cannot rewind past the positions it holds",
            ));
        }
        match &mut self.state {
            State::Unsplit { cache } => cache.truncate(len),
            State::Split(device) => device.rewind(self.position, len)?,
        }
        self.position = len;
        self.history.truncate(len);
        Ok(())
    }

    /// True when the trunk runs in this process, so a step has no round trip.
    fn in_process(&self) -> bool {
        match &self.state {
            State::Split(device) => device.trunk.in_process(),
            State::Unsplit { .. } => true,
        }
    }

    /// Layers of the draft model per layer the device runs in a step: what a drafted token
    /// costs against the device's share of a step (1 without a draft model or a split).
    fn draft_scale(&self) -> f64 {
        match (self.model.draft_model(), &self.model.parts) {
            (Some(draft), Parts::Split { head, tail, .. }) => {
                let local = head.spec().layers.len() + tail.spec().layers.len();
                draft.part().spec().layers.len() as f64 / local.max(1) as f64
            }
            _ => 1.0,
        }
    }

    /// Refuses a source this session cannot draft from.
    fn check_source(&self, speculate: Speculate) -> Result<(), SplitError> {
        match (speculate, &self.state) {
            (Speculate::EarlyExit, State::Unsplit { .. }) => Err(SplitError::Layout(
                "--speculate early-exit sends the head's output straight to the tail: it needs \
                 a split",
            )),
            (Speculate::Draft, _) if self.model.draft_model().is_none() => Err(SplitError::Layout(
                "--speculate draft needs a draft model (--draft-model PATH)",
            )),
            _ => Ok(()),
        }
    }

    /// Tokens to check after `next` (chosen, not yet run), at most `room`, from the source
    /// `drafter` picks among those this session has, that source, and the time spent running
    /// the sequence so far into a draft model that had not seen it (its prefill, which is no
    /// part of what drafting a token costs).
    fn draft(
        &mut self,
        drafter: &mut Drafter,
        next: u32,
        room: usize,
    ) -> Result<(Option<Source>, Vec<u32>, Duration), SplitError> {
        if !drafter.drafts() {
            return Ok((None, Vec::new(), Duration::ZERO));
        }
        let mut tokens = self.history.clone();
        tokens.push(next);
        let proposal = lookup(&tokens, room);
        let guesses = self.lookahead.propose(&tokens, room);
        let mut offers = vec![
            (Source::Lookup, proposal.len()),
            (Source::Lookahead, guesses.len()),
        ];
        if matches!(self.state, State::Split(_)) {
            offers.push((Source::EarlyExit, room));
        }
        if self.model.draft_model().is_some() {
            offers.push((Source::Model, room));
        }
        let Some((source, count)) = drafter.plan(&offers) else {
            return Ok((None, Vec::new(), Duration::ZERO));
        };
        let mut prefill = Duration::ZERO;
        let draft = match (source, &mut self.state, self.model.draft_model()) {
            (Source::Lookup, _, _) => proposal[..count].to_vec(),
            (Source::Lookahead, _, _) => guesses[..count].to_vec(),
            (Source::EarlyExit, State::Split(device), _) => {
                device.draft_early_exit(next, self.position, count)?
            }
            (Source::Model, _, Some(model)) => {
                let vocab = self.model.parts()[0].config().vocab_size;
                let cache = match &mut self.draft {
                    Some(cache) => cache,
                    None => {
                        let t = Instant::now();
                        let mut cache = DraftCache::new(model);
                        cache.prefill(&self.history)?;
                        prefill = t.elapsed();
                        self.draft.insert(cache)
                    }
                };
                cache.draft(&tokens, count, vocab)?
            }
            _ => Vec::new(),
        };
        Ok((Some(source), draft, prefill))
    }

    fn run(&mut self, tokens: &[u32], every_row: bool) -> Result<Vec<Vec<f32>>, SplitError> {
        // With every part in-process, the step runs as one task of the compute pool instead of
        // entering it once per part; a network trunk's wait must not hold a pool thread.
        if self.in_process() {
            lsplit_model::on_pool(|| self.step(tokens, every_row))
        } else {
            self.step(tokens, every_row)
        }
    }

    /// One step on the current thread: the logits after every token, or after the last.
    fn step(&mut self, tokens: &[u32], every_row: bool) -> Result<Vec<Vec<f32>>, SplitError> {
        if tokens.is_empty() {
            return Err(SplitError::EmptyPrompt);
        }
        let context = self.model.context_length();
        if self.position + tokens.len() > context {
            return Err(SplitError::PromptTooLong {
                tokens: self.position + tokens.len(),
                context,
            });
        }
        let start = self.position;
        let layers = self.model.layers();
        let logits = match (&self.model.parts, &mut self.state) {
            (Parts::Unsplit(whole), State::Unsplit { cache }) => {
                let t = Instant::now();
                let hidden = whole.forward(&whole.embed(tokens)?, start, cache)?;
                let logits = if every_row {
                    whole.row_logits(&hidden)?.to_vec2::<f32>()?
                } else {
                    vec![whole.logits(&hidden)?.to_vec1::<f32>()?]
                };
                self.stats.head += t.elapsed();
                self.stats.layer_rows += (tokens.len() * layers) as u64;
                logits
            }
            (Parts::Split { .. }, State::Split(device)) => {
                let (stats, capture) = (&mut self.stats, &mut self.capture);
                let mut exchanged = |e: &Exchange| -> Result<(), SplitError> {
                    stats.bytes_up += e.up.rows.bytes.len() as u64;
                    stats.bytes_down += e.down.rows.bytes.len() as u64;
                    stats.catch_up_rows_up += e.catch_up_up as u64;
                    stats.catch_up_rows_down += e.catch_up_down as u64;
                    stats.head += e.times[0];
                    stats.trunk += e.times[1];
                    stats.tail += e.times[2];
                    if let Some(capture) = capture {
                        let (up, down) = (&e.up, &e.down);
                        capture.record(Way::Up, up.step, Some(&up.tag), up.rewind, &up.rows)?;
                        capture.record(Way::Down, down.step, Some(&down.tag), 0, &down.rows)?;
                    }
                    Ok(())
                };
                let codec = self.model.codec();
                let logits = device.forward(tokens, start, codec, every_row, &mut exchanged)?;
                self.stats.layer_rows = device.layer_rows();
                logits
            }
            _ => return Err(SplitError::Layout("session state does not match the model")),
        };
        self.position += tokens.len();
        self.history.extend_from_slice(tokens);
        Ok(logits)
    }

    /// Generates a continuation of `prompt`, calling `on_text` with each new piece of text as
    /// soon as it is complete.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation, SplitError> {
        let mut streamed = 0;
        let generation = self.generate_steps(prompt, options, &mut |step| {
            if !step.text.is_empty() {
                on_text(step.text);
                streamed += step.text.len();
            }
            ControlFlow::Continue(())
        })?;
        if let Some(rest) = generation.text.get(streamed..).filter(|r| !r.is_empty()) {
            on_text(rest);
        }
        Ok(generation)
    }

    /// Generates a continuation of `prompt`, calling `on_step` after each generated token (the
    /// end-of-sequence token excluded, unless [`GenerateOptions::ignore_eos`]); `ControlFlow::Break` ends the generation with
    /// [`StopReason::Stopped`]. Text still pending when generation ends (an incomplete
    /// character) is not reported as a step but is part of [`Generation::text`].
    pub fn generate_steps(
        &mut self,
        prompt: &[u32],
        options: &GenerateOptions,
        on_step: &mut dyn FnMut(&Step<'_>) -> ControlFlow<()>,
    ) -> Result<Generation, SplitError> {
        let context = self.model.context_length();
        if self.position + prompt.len() > context {
            return Err(SplitError::PromptTooLong {
                tokens: self.position + prompt.len(),
                context,
            });
        }
        self.check_source(options.speculate)?;
        let tokenizer = self.model.tokenizer();
        let eos = tokenizer.eos_tokens().to_vec();
        let mut sampler = Sampler::new(options.sampling.clone());
        let mut decoder = tokenizer.decoder();
        let mut text = String::new();
        let mut generated = Vec::new();
        let mut rejected = Vec::new();

        let t = Instant::now();
        let prefilled = self.forward(prompt)?;
        self.stats.prefill += t.elapsed();
        self.stats.prompt_tokens += prompt.len();

        // Logits waiting for a token choice, and the drafted tokens already run after them:
        // `drafts[i]` was run after the choice from `pending[i]`, whose successor is
        // `pending[i + 1]`. Without drafting both hold one set of logits and nothing.
        let mut pending = VecDeque::from([prefilled]);
        let mut drafts = VecDeque::<u32>::new();
        // `auto` over a network link goes on from what the device's earlier sessions learnt.
        let keeps = options.speculate == Speculate::Auto && !self.in_process();
        let mut drafter = keeps
            .then(|| self.model.take_drafter())
            .flatten()
            .unwrap_or_else(|| Drafter::new(options.speculate, self.in_process()));
        let mut window = Window::default();
        let draft_scale = self.draft_scale();
        let base = self.position - prompt.len();
        let decode_start = Instant::now();
        let stop = loop {
            let logits = pending.pop_front().expect("logits for the next choice");
            if generated.len() >= options.max_tokens {
                break StopReason::MaxTokens;
            }
            let t = Instant::now();
            let seen = self.history.len() - drafts.len();
            let next = sampler.sample(&logits, &self.history[..seen]);
            self.stats.sampling += t.elapsed();
            if eos.contains(&next) && !options.ignore_eos {
                break StopReason::Eos;
            }
            generated.push(next);
            let piece = decoder.push(next)?.unwrap_or_default();
            text.push_str(&piece);
            let step = Step {
                token: next,
                logits: &logits,
                text: &piece,
                stats: &self.stats,
            };
            if on_step(&step).is_break() {
                break StopReason::Stopped;
            }
            match drafts.pop_front() {
                Some(drafted) if drafted == next => {
                    // Already run: its successor's logits are next in line.
                    self.stats.accepted_tokens += 1;
                    self.stats.decode_tokens += 1;
                    window.kept += 1;
                    continue;
                }
                Some(missed) => {
                    // The first miss: forget it and every draft after it, then run the choice.
                    let from = self.position - drafts.len() - 1;
                    rejected.extend(
                        std::iter::once(missed)
                            .chain(drafts.drain(..))
                            .enumerate()
                            .map(|(i, token)| RejectedDraft {
                                position: from + i,
                                token,
                            }),
                    );
                    self.rewind(from)?;
                    pending.clear();
                }
                None => {}
            }
            if generated.len() >= options.max_tokens {
                break StopReason::MaxTokens;
            }
            if self.position >= context {
                break StopReason::ContextFull;
            }
            // Drafts stop before the last token to generate: it is chosen from the logits after
            // the one before it and, as with one-token steps, never run.
            let room = (options.max_tokens - generated.len() - 1).min(context - self.position - 1);
            let Window {
                source,
                drafted,
                kept,
                time,
                drafting,
            } = window;
            drafter.record(source, drafted, kept, time, drafting);
            let t = Instant::now();
            let (source, draft, prefill) = self.draft(&mut drafter, next, room)?;
            self.stats.drafting += t.elapsed();
            let drafting = t.elapsed().saturating_sub(prefill);
            let t = Instant::now();
            if draft.is_empty() {
                let local = self.stats.head + self.stats.tail;
                pending.push_back(self.forward(&[next])?);
                let local = self.stats.head + self.stats.tail - local;
                drafter.expect(Source::EarlyExit, local);
                drafter.expect(Source::Model, local.mul_f64(draft_scale));
            } else {
                let mut run = vec![next];
                run.extend_from_slice(&draft);
                let at = self.position;
                let rows = self.forward_rows(&run)?;
                if source == Some(Source::Lookahead) {
                    let outputs: Vec<u32> = rows.iter().map(|row| argmax(row)).collect();
                    self.lookahead.observe(at, &run, &outputs);
                }
                pending.extend(rows);
                self.stats.drafted_tokens += draft.len();
            }
            window = Window {
                source,
                drafted: draft.len(),
                kept: 0,
                time: t.elapsed(),
                drafting,
            };
            drafts.extend(draft);
            self.stats.decode_steps += 1;
            self.stats.decode_tokens += 1;
        };
        // The session ends holding what one-token steps would have run: every generated token
        // but the last (which was never run), unless the model ended the sequence. Drafts run
        // past that are forgotten.
        let unrun = usize::from(stop != StopReason::Eos && !generated.is_empty());
        let end = base + prompt.len() + generated.len() - unrun;
        // Drafts never checked (the sequence ended first) were run all the same.
        let from = self.position - drafts.len();
        rejected.extend(
            drafts
                .drain(..)
                .enumerate()
                .map(|(i, token)| RejectedDraft {
                    position: from + i,
                    token,
                }),
        );
        if self.position > end {
            self.rewind(end)?;
        }
        self.stats.decode += decode_start.elapsed();
        self.stats.generated_tokens += generated.len();
        if keeps {
            self.model.keep_drafter(drafter);
        }
        if let Some(piece) = decoder.finish()? {
            text.push_str(&piece);
        }
        Ok(Generation {
            tokens: generated,
            text,
            stop,
            stats: self.stats.clone(),
            rejected,
        })
    }
}
