use std::ops::ControlFlow;
use std::time::Instant;

use lsplit_model::KvCache;

use crate::capture::{CaptureWriter, Way};
use crate::device::Parts;
use crate::step::{DeviceState, Exchange};
use crate::{DeviceModel, Sampler, SamplingParams, SessionKeys, SplitError, Stats, Trunk};

/// What a generation is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Stop after this many generated tokens.
    pub max_tokens: usize,
    /// How tokens are chosen.
    pub sampling: SamplingParams,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingParams::default(),
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
    /// The text this token completed; empty while a character is still incomplete.
    pub text: &'a str,
    /// Time and bytes of the generation so far; the difference between two steps is the cost
    /// of one token (for the first step, of the prompt pass).
    pub stats: &'a Stats,
}

/// The result of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated token ids (the end-of-sequence token excluded).
    pub tokens: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// Why generation ended.
    pub stop: StopReason,
    /// Time and bytes.
    pub stats: Stats,
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
        let device = DeviceState::new(head.clone(), tail.clone(), trunk, keys)?;
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
        // With every part in-process, the step runs as one task of the compute pool instead of
        // entering it once per part; a network trunk's wait must not hold a pool thread.
        let in_process = match &self.state {
            State::Split(device) => device.trunk.in_process(),
            State::Unsplit { .. } => true,
        };
        if in_process {
            lsplit_model::on_pool(|| self.step(tokens))
        } else {
            self.step(tokens)
        }
    }

    /// [`Session::forward`] on the current thread.
    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SplitError> {
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
                let logits = whole.logits(&hidden)?.to_vec1::<f32>()?;
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
                        capture.record(Way::Up, e.up.step, Some(&e.up.tag), &e.up.rows)?;
                        capture.record(Way::Down, e.down.step, Some(&e.down.tag), &e.down.rows)?;
                    }
                    Ok(())
                };
                let logits = device.forward(tokens, start, self.model.codec(), &mut exchanged)?;
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
    /// end-of-sequence token excluded); `ControlFlow::Break` ends the generation with
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
        let tokenizer = self.model.tokenizer();
        let eos = tokenizer.eos_tokens().to_vec();
        let mut sampler = Sampler::new(options.sampling.clone());
        let mut decoder = tokenizer.decoder();
        let mut text = String::new();
        let mut generated = Vec::new();

        let t = Instant::now();
        let mut logits = self.forward(prompt)?;
        self.stats.prefill += t.elapsed();
        self.stats.prompt_tokens += prompt.len();

        let decode_start = Instant::now();
        let stop = loop {
            if generated.len() >= options.max_tokens {
                break StopReason::MaxTokens;
            }
            let t = Instant::now();
            let next = sampler.sample(&logits, &self.history);
            self.stats.sampling += t.elapsed();
            if eos.contains(&next) {
                break StopReason::Eos;
            }
            generated.push(next);
            let piece = decoder.push(next)?.unwrap_or_default();
            text.push_str(&piece);
            let step = Step {
                token: next,
                text: &piece,
                stats: &self.stats,
            };
            if on_step(&step).is_break() {
                break StopReason::Stopped;
            }
            if generated.len() >= options.max_tokens {
                break StopReason::MaxTokens;
            }
            if self.position >= context {
                break StopReason::ContextFull;
            }
            logits = self.forward(&[next])?;
            self.stats.decode_steps += 1;
        };
        self.stats.decode += decode_start.elapsed();
        self.stats.generated_tokens += generated.len();
        if let Some(piece) = decoder.finish()? {
            text.push_str(&piece);
        }
        Ok(Generation {
            tokens: generated,
            text,
            stop,
            stats: self.stats.clone(),
        })
    }
}
