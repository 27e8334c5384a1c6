//! The tables of PRIVACY.md: every prompt generated greedily through a keyed session under each
//! setting (a split policy, rows permuted or not, noise on the uplink, a private adapter), each
//! wire capture attacked, and per setting the recovery rates, the utility left (perplexity and
//! greedy agreement against the unsplit public model) and the cost (time and bytes).
//!
//! Two sets of settings: [`Setting::grid`], fixed and random split points at several depths,
//! and [`Setting::defences`], every defence and some combinations at the default split 2:28.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use lsplit_model::{ModelSource, PartKind, PartSpec, SplitPlan};
use lsplit_split::{
    CaptureWriter, DeviceModel, GenerateOptions, Obfuscation, SplitPolicy, UplinkNoise,
    read_capture,
};
use lsplit_tokenizer::Tokenizer;
use lsplit_wire::Codec;

use crate::{AttackError, Attacker, Knowledge, Options, Rate, Scores};

/// The prompts of the table: questions, instructions, personal and business text with secrets
/// (numbers, names), code. The first [`TUNING`] choose a defence; the rest are held out.
pub const PROMPTS: [&str; 20] = [
    "What is the capital of France?",
    "List three uses of copper.",
    "Write one sentence about the sea.",
    "My doctor says my blood pressure is 150 over 95. Is that bad?",
    "Translate 'good morning' into Spanish.",
    "Write a Python function that reverses a string.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do I reset my bank account password?",
    "Remind me to call Dr. Okafor at 555-0147 about my test results on March 3.",
    "Why is the sky blue?",
    "Draft an email telling my manager I will be late tomorrow.",
    "What are the symptoms of the flu?",
    "Explain recursion to a child.",
    "My name is Alice Martin and I live at 12 Rue Lepic, Paris. Write me a short bio.",
    "My bank PIN is 4921 and my sister's name is Aiko. Remind me of both.",
    "What is 17 times 23?",
    "Write a haiku about autumn.",
    "How can I improve my credit score?",
    "Describe the water cycle.",
    "Our quarterly revenue fell 12 percent. Write a note to investors.",
];

/// Prompts of [`PROMPTS`] a defence may be chosen on; the others are held out.
pub const TUNING: usize = 10;

/// The δ the table's ε are stated at.
pub const DELTA: f64 = 1e-5;

/// One setting of a table: a split policy, whether rows are permuted, noise on the uplink, a
/// private adapter, and what the attacker knows of the split points.
#[derive(Debug, Clone)]
pub struct Setting {
    /// The grid's K1 this setting was made from.
    pub k1: usize,
    /// The split policy of the sessions.
    pub policy: SplitPolicy,
    /// Whether the sessions permute their rows.
    pub obfuscation: Obfuscation,
    /// Noise the sessions add to their uplink rows.
    pub noise: Option<UplinkNoise>,
    /// Whether the sessions run [`Table::adapted`], the private adapter the attacker lacks.
    pub adapter: bool,
    /// What the attacker knows: a fixed split's points, or only how deep to search.
    pub knowledge: Knowledge,
}

/// Which policies of the grid to measure for each K1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policies {
    /// The fixed split `K1:L-K1`, its points known to the attacker.
    pub fixed: bool,
    /// A random policy drawing K1 from `K1..=K1+3` and K2 from `L-K1-3..=L-K1`, its points
    /// secret.
    pub random: bool,
}

/// The fixed split `k1:L-k1` and the random policy around it (K1 from `k1..=k1+3`, K2 from
/// `L-k1-3..=L-k1`), for a model of `layers` layers.
fn policies(k1: usize, layers: usize) -> Result<(SplitPolicy, SplitPolicy), AttackError> {
    if k1 < 1 || 2 * (k1 + 3) >= layers {
        return Err(AttackError::Capture(format!(
            "--grid-k1 {k1} does not fit {layers} layers"
        )));
    }
    let fixed = SplitPolicy::fixed(SplitPlan::new(k1, layers - k1, layers)?);
    let random = SplitPolicy::random(
        &(k1..=k1 + 3).collect::<Vec<_>>(),
        &(layers - k1 - 3..=layers - k1).collect::<Vec<_>>(),
        layers,
    )?;
    Ok((fixed, random))
}

/// What an attacker knows of `policy`: a fixed split's points, or a random one's depth.
fn knowledge(policy: &SplitPolicy, budget: usize) -> Knowledge {
    let (k1s, k2s) = (policy.k1s(), policy.k2s());
    let deepest = k1s.iter().copied().max().unwrap_or(0);
    if policy.is_fixed() {
        Knowledge {
            k1: Some(k1s[0]),
            k2: Some(k2s[0]),
            max_k: deepest,
            budget,
        }
    } else {
        Knowledge {
            k1: None,
            k2: None,
            max_k: deepest,
            budget,
        }
    }
}

/// The relative noise levels of [`Setting::defences`], chosen before any was measured.
pub const NOISE_LEVELS: [f32; 4] = [0.05, 0.1, 0.2, 0.5];

impl Setting {
    /// The settings of the grid over `k1s` for a model of `layers` layers, each without and
    /// with permutation; vocabulary matching tries at most `budget` tokens per position.
    pub fn grid(
        k1s: &[usize],
        chosen: Policies,
        layers: usize,
        budget: usize,
    ) -> Result<Vec<Self>, AttackError> {
        let mut settings = Vec::new();
        for &k1 in k1s {
            let (fixed, random) = policies(k1, layers)?;
            let grid = [(chosen.fixed, fixed), (chosen.random, random)];
            for (_, policy) in grid.into_iter().filter(|g| g.0) {
                for obfuscation in [Obfuscation::None, Obfuscation::Permute] {
                    settings.push(Self {
                        k1,
                        knowledge: knowledge(&policy, budget),
                        policy: policy.clone(),
                        obfuscation,
                        noise: None,
                        adapter: false,
                    });
                }
            }
        }
        Ok(settings)
    }

    /// Every defence at the default split 2:28 of a model of `layers` layers, alone and
    /// combined: none, random split points, the permutation, the private adapter, each of
    /// [`NOISE_LEVELS`] (seeded, so that the table repeats), noise with the adapter, and all
    /// of them together.
    pub fn defences(layers: usize, budget: usize) -> Result<Vec<Self>, AttackError> {
        let (fixed, random) = policies(2, layers)?;
        let noise = |sigma: f32| UplinkNoise::new(sigma, None, Some(20)).map(Some);
        let base = Self {
            k1: 2,
            knowledge: knowledge(&fixed, budget),
            policy: fixed,
            obfuscation: Obfuscation::None,
            noise: None,
            adapter: false,
        };
        let with_random = Self {
            knowledge: knowledge(&random, budget),
            policy: random,
            ..base.clone()
        };
        let mut settings = vec![
            base.clone(),
            with_random.clone(),
            Self {
                obfuscation: Obfuscation::Permute,
                ..base.clone()
            },
            Self {
                adapter: true,
                ..base.clone()
            },
        ];
        for sigma in NOISE_LEVELS {
            settings.push(Self {
                noise: noise(sigma)?,
                ..base.clone()
            });
        }
        settings.push(Self {
            noise: noise(0.2)?,
            adapter: true,
            ..base.clone()
        });
        settings.push(Self {
            noise: noise(0.2)?,
            adapter: true,
            obfuscation: Obfuscation::Permute,
            ..with_random
        });
        Ok(settings)
    }

    /// The flags of `lsplit generate` that give this setting (the default split 2:28 needs
    /// none; the noise's seed is left out: users draw fresh noise), `adapter` naming the
    /// private adapter's directory.
    pub fn flags(&self, adapter: &str) -> String {
        let mut flags = Vec::new();
        let (k1s, k2s) = (self.policy.k1s(), self.policy.k2s());
        match self.policy.is_fixed() {
            true if k1s[0] == 2 && k2s[0] + 2 == self.policy.layers() => {}
            true => flags.push(format!("--split {}:{}", k1s[0], k2s[0])),
            false => flags.push(format!(
                "--split-policy random --k1 {} --k2 {}",
                list(self.policy.k1s()),
                list(self.policy.k2s())
            )),
        }
        if self.obfuscation != Obfuscation::None {
            flags.push(format!("--obfuscate {}", self.obfuscation));
        }
        if self.adapter {
            flags.push(format!("--adapter {adapter}"));
        }
        if let Some(noise) = &self.noise {
            flags.push(noise.flags());
        }
        flags.join(" ")
    }

    /// A short name of the setting for `attack --table --settings`: its defences joined by `+`
    /// (`random`, `permute`, `adapter`, `noise` and its SIGMA), or `none`.
    pub fn name(&self) -> String {
        let mut parts = Vec::new();
        if !self.policy.is_fixed() {
            parts.push("random".to_string());
        }
        if self.obfuscation != Obfuscation::None {
            parts.push(self.obfuscation.to_string());
        }
        if self.adapter {
            parts.push("adapter".to_string());
        }
        if let Some(noise) = &self.noise {
            parts.push(format!("noise{}", noise.sigma()));
        }
        if parts.is_empty() {
            return "none".to_string();
        }
        parts.join("+")
    }

    /// The settings of `settings` named in `names` (see [`Setting::name`]), in the table's
    /// order; an unknown name is refused with the known ones.
    pub fn select(settings: Vec<Self>, names: &[&str]) -> Result<Vec<Self>, AttackError> {
        let known: Vec<String> = settings.iter().map(Self::name).collect();
        if let Some(unknown) = names.iter().find(|n| !known.iter().any(|k| k == *n)) {
            return Err(AttackError::Capture(format!(
                "--settings: no setting {unknown:?}; the settings are {}",
                known.join(", ")
            )));
        }
        Ok(settings
            .into_iter()
            .filter(|s| names.contains(&s.name().as_str()))
            .collect())
    }

    /// The ε (at [`DELTA`]) the setting's noise guarantees for any two rows of `width` values
    /// of the same clipped RMS; `None` without noise (no guarantee at all).
    pub fn epsilon(&self, width: usize) -> Option<f64> {
        self.noise.map(|n| n.worst_epsilon(width, DELTA))
    }
}

/// `2,3,4,5`.
fn list(values: &[usize]) -> String {
    values
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The deepest boundary any of `settings` searches: how deep the [`Attacker`] must reach.
pub fn deepest(settings: &[Setting]) -> usize {
    settings
        .iter()
        .map(|s| s.knowledge.max_k)
        .max()
        .unwrap_or(0)
}

/// What one prompt under one setting measured.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Measure {
    /// Each attack's recovery.
    pub scores: Scores,
    /// Negative log-likelihood (nats) of the prompt and the reference's reply under the
    /// setting, teacher-forced, summed over the tokens predicted.
    pub nll: f64,
    /// The same under the unsplit public model.
    pub reference_nll: f64,
    /// Tokens predicted by those sums.
    pub predicted: usize,
    /// Leading greedy tokens equal to the unsplit public model's.
    pub agreeing: usize,
    /// Greedy tokens the unsplit public model generated.
    pub reference_tokens: usize,
    /// Wall time of the generation.
    pub time: Duration,
    /// Positions the generation ran (prompt and generated tokens).
    pub positions: usize,
    /// Bytes sent to and received from the trunk.
    pub bytes: u64,
}

impl Measure {
    /// Adds another prompt's measures.
    pub fn add(&mut self, other: &Measure) {
        let s = &mut self.scores;
        s.replay.add(other.scores.replay);
        s.matching.add(other.scores.matching);
        s.lens.add(other.scores.lens);
        s.inversion.add(other.scores.inversion);
        s.known_plaintext.add(other.scores.known_plaintext);
        s.decoder.add(other.scores.decoder);
        self.nll += other.nll;
        self.reference_nll += other.reference_nll;
        self.predicted += other.predicted;
        self.agreeing += other.agreeing;
        self.reference_tokens += other.reference_tokens;
        self.time += other.time;
        self.positions += other.positions;
        self.bytes += other.bytes;
    }

    /// The sum of `measures`.
    pub fn total<'a>(measures: impl IntoIterator<Item = &'a Measure>) -> Measure {
        let mut total = Measure::default();
        measures.into_iter().for_each(|m| total.add(m));
        total
    }

    /// Perplexity under the setting over perplexity under the unsplit model (1: unchanged).
    pub fn perplexity_ratio(&self) -> f64 {
        ((self.nll - self.reference_nll) / self.predicted.max(1) as f64).exp()
    }

    /// Percent of the unsplit model's greedy tokens reproduced before the first difference.
    pub fn agreement_percent(&self) -> f64 {
        Rate {
            prompt: self.agreeing,
            prompt_total: self.reference_tokens,
            ..Rate::default()
        }
        .prompt_percent()
    }

    /// The best attack's recovery of the user's own prompt text, percent, and its name.
    pub fn best_prompt_attack(&self) -> (f64, &'static str) {
        let s = &self.scores;
        [
            ("replay", s.replay),
            ("matching", s.matching),
            ("logit lens", s.lens),
            ("downlink inversion", s.inversion),
            ("known plaintext", s.known_plaintext),
            ("learned decoder", s.decoder),
        ]
        .into_iter()
        .map(|(name, rate)| (rate.user_percent(), name))
        .fold(
            (f64::NEG_INFINITY, ""),
            |best, x| if x.0 > best.0 { x } else { best },
        )
    }

    /// Milliseconds of generation per position.
    pub fn ms_per_token(&self) -> f64 {
        1000.0 * self.time.as_secs_f64() / self.positions.max(1) as f64
    }

    /// Bytes on the wire per position.
    pub fn bytes_per_token(&self) -> f64 {
        self.bytes as f64 / self.positions.max(1) as f64
    }

    /// Whether the utility goals of issue 20 hold: perplexity within +10% and greedy
    /// agreement of at least 90%.
    pub fn keeps_utility(&self) -> bool {
        Summary::pick(&[Summary {
            defended: true,
            perplexity_ratio: self.perplexity_ratio(),
            agreement_percent: self.agreement_percent(),
            best_prompt_percent: 0.0,
        }])
        .is_some()
    }
}

/// The goal for the best attack's prompt recovery, percent.
pub const GOAL_PERCENT: f64 = 20.0;

/// The line of PRIVACY.md that names the setting to use: the flags to add to `lsplit generate`.
pub fn recommended_line(flags: &str) -> String {
    format!("Recommended defence: `{flags}`")
}

/// The [`adapter::write_random_adapter`](crate::adapter::write_random_adapter) strength of the
/// private adapter the defences table generates when none is given.
pub const ADAPTER_STRENGTH: f32 = 0.1;

/// The setting to recommend, chosen on the tuning prompts only: of the defended settings (any
/// flag) that keep utility there, the one whose best attack recovers the least of the prompt
/// (ties: the first). `None` when no defended setting keeps utility.
pub fn recommend(settings: &[Setting], tuning: &[Measure]) -> Option<usize> {
    let rows: Vec<Summary> = settings
        .iter()
        .zip(tuning)
        .map(|(s, m)| Summary {
            defended: !s.flags("DIR").is_empty(),
            perplexity_ratio: m.perplexity_ratio(),
            agreement_percent: m.agreement_percent(),
            best_prompt_percent: m.best_prompt_attack().0,
        })
        .collect();
    Summary::pick(&rows)
}

/// What the choice of a defence looks at in one row of the table (also as read back from
/// PRIVACY.md by its test).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Whether the row adds any flag.
    pub defended: bool,
    /// [`Measure::perplexity_ratio`].
    pub perplexity_ratio: f64,
    /// [`Measure::agreement_percent`].
    pub agreement_percent: f64,
    /// [`Measure::best_prompt_attack`]'s percent.
    pub best_prompt_percent: f64,
}

impl Summary {
    /// Of the defended rows that keep utility (perplexity within +10%, agreement of at least
    /// 90%), the one whose best attack recovers the least of the prompt (ties: the first).
    pub fn pick(rows: &[Summary]) -> Option<usize> {
        rows.iter()
            .enumerate()
            .filter(|(_, r)| {
                r.defended && r.perplexity_ratio <= 1.10 && r.agreement_percent >= 90.0
            })
            .fold(None, |best: Option<(usize, f64)>, (i, r)| match best {
                Some((_, b)) if b <= r.best_prompt_percent => best,
                _ => Some((i, r.best_prompt_percent)),
            })
            .map(|(i, _)| i)
    }
}

/// The header of the defences table (the learned decoder's column last, so that the columns
/// before it keep their places).
pub const DEFENCES_HEADER: &str = "| flags | epsilon | perplexity | greedy agreement | replay | \
    matching | logit lens | downlink inversion | known plaintext | best attack on the prompt | \
    ms per token | bytes per token | learned decoder |";

/// One row of the defences table: `flags` (empty: none), the noise's `epsilon` and what `m`
/// measured, under [`DEFENCES_HEADER`].
pub fn defence_row(flags: &str, epsilon: Option<f64>, m: &Measure) -> String {
    let rate = |r: &Rate| format!("{:.1}% / {:.1}%", r.user_percent(), r.generated_percent());
    let s = &m.scores;
    let (best, name) = m.best_prompt_attack();
    format!(
        "| `{}` | {} | {:+.1}% | {:.1}% | {} | {} | {} | {} | {} | {best:.1}% ({name}) | {:.1} | {:.0} | {} |",
        if flags.is_empty() { "(none)" } else { flags },
        epsilon.map_or_else(|| "-".to_string(), |e| format!("{e:.3e}")),
        100.0 * (m.perplexity_ratio() - 1.0),
        m.agreement_percent(),
        rate(&s.replay),
        rate(&s.matching),
        rate(&s.lens),
        rate(&s.inversion),
        rate(&s.known_plaintext),
        m.ms_per_token(),
        m.bytes_per_token(),
        rate(&s.decoder),
    )
}

/// A run of the table: the model, the prompts and how long each generation is.
pub struct Table<'a> {
    /// The public model, whose parts every session and the attacker load.
    pub source: &'a ModelSource,
    /// The same model with the private adapter, for settings that run it.
    pub adapted: Option<&'a ModelSource>,
    /// The model's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The prompts generated under each setting ([`PROMPTS`] by default).
    pub prompts: Vec<String>,
    /// Greedy tokens generated at most per prompt.
    pub max_tokens: usize,
    /// Most candidates downlink inversion tries per position.
    pub inversion_budget: usize,
    /// Where each session's wire capture is written (emptied before each, removed at the end).
    pub scratch: PathBuf,
}

/// The unsplit public model's greedy reply to a prompt and the likelihood of prompt and reply.
struct Reference {
    prompt: Vec<u32>,
    /// Where in `prompt` the user's own text lies ([`crate::user_text`]).
    user: Range<usize>,
    reply: Vec<u32>,
    nll: f64,
}

impl Table<'_> {
    /// Generates every prompt under every setting (f32 on the wire), attacks each capture with
    /// `attacker` (deep enough for [`deepest`]`(settings)`), measures utility and cost, and
    /// returns each setting's measures per prompt; `on_prompt` is called after each prompt,
    /// `on_row` after each setting.
    pub fn run(
        &self,
        attacker: &Attacker,
        settings: &[Setting],
        on_prompt: &mut dyn FnMut(&Setting),
        on_row: &mut dyn FnMut(&Setting, &[Measure]),
    ) -> Result<Vec<Vec<Measure>>, AttackError> {
        let device = Device::Cpu;
        let options = GenerateOptions {
            max_tokens: self.max_tokens,
            ..GenerateOptions::default()
        };
        let attack_options = Options {
            known_prefix: crate::template_prefix(&self.tokenizer)?,
            inversion_budget: self.inversion_budget,
            ..Options::default()
        };
        let references = self.references(&options)?;
        let mut rows = Vec::with_capacity(settings.len());
        for setting in settings {
            let source = match (setting.adapter, self.adapted) {
                (false, _) => self.source,
                (true, Some(adapted)) => adapted,
                (true, None) => {
                    return Err(AttackError::Capture(
                        "a setting runs the private adapter but the table has none".into(),
                    ));
                }
            };
            let trunk = Arc::new(source.load_part(
                &PartSpec {
                    kind: PartKind::Trunk,
                    layers: setting.policy.trunk_layers(),
                },
                &device,
            )?);
            let mut model = DeviceModel::split(
                source,
                setting.policy.clone(),
                Arc::clone(&self.tokenizer),
                Codec::F32,
                &device,
            )?;
            model.set_uplink_noise(setting.noise)?;
            let mut measures = Vec::with_capacity(self.prompts.len());
            for reference in &references {
                let mut session = model.local_session(&trunk, setting.obfuscation)?;
                clear(&self.scratch)?;
                session.capture(CaptureWriter::create(&self.scratch)?);
                let t = Instant::now();
                let generation = session.generate(&reference.prompt, &options, &mut |_| {})?;
                let time = t.elapsed();
                drop(session);
                let messages = read_capture(&self.scratch)?;
                let recovery = attacker.run_with(&messages, &setting.knowledge, &attack_options)?;
                let mut forced = model.local_session(&trunk, setting.obfuscation)?;
                let text = [&reference.prompt[..], &reference.reply[..]].concat();
                let logits = forced.forward_rows(&text)?;
                measures.push(Measure {
                    scores: recovery.score(
                        &reference.prompt,
                        &generation.tokens,
                        reference.user.clone(),
                    ),
                    nll: nll(&logits, &text),
                    reference_nll: reference.nll,
                    predicted: text.len() - 1,
                    agreeing: leading_agreement(&generation.tokens, &reference.reply),
                    reference_tokens: reference.reply.len(),
                    time,
                    positions: generation.stats.prompt_tokens + generation.tokens.len(),
                    bytes: generation.stats.bytes_up + generation.stats.bytes_down,
                });
                on_prompt(setting);
            }
            on_row(setting, &measures);
            rows.push(measures);
        }
        clear(&self.scratch)?;
        Ok(rows)
    }

    /// The unsplit public model's greedy reply to each prompt and its likelihood.
    fn references(&self, options: &GenerateOptions) -> Result<Vec<Reference>, AttackError> {
        let model = DeviceModel::unsplit(self.source, Arc::clone(&self.tokenizer), &Device::Cpu)?;
        self.prompts
            .iter()
            .map(|prompt| {
                let prompt = model.prompt_tokens(prompt, false)?;
                let reply = model
                    .unsplit_session()?
                    .generate(&prompt, options, &mut |_| {})?
                    .tokens;
                let text = [&prompt[..], &reply[..]].concat();
                let logits = model.unsplit_session()?.forward_rows(&text)?;
                Ok(Reference {
                    nll: nll(&logits, &text),
                    user: crate::user_text(&self.tokenizer, &prompt)?,
                    prompt,
                    reply,
                })
            })
            .collect()
    }
}

/// `-Σ ln p(text[i+1])` under `logits[i]`, the logits after each token of `text`.
fn nll(logits: &[Vec<f32>], text: &[u32]) -> f64 {
    logits
        .iter()
        .zip(&text[1..])
        .map(|(row, &next)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let total: f64 = row.iter().map(|l| f64::from(l - max).exp()).sum();
            total.ln() - f64::from(row[next as usize] - max)
        })
        .sum()
}

/// Leading tokens of `tokens` equal to `reference`'s.
fn leading_agreement(tokens: &[u32], reference: &[u32]) -> usize {
    tokens
        .iter()
        .zip(reference)
        .take_while(|(a, b)| a == b)
        .count()
}

/// Removes the directory `dir` if it exists.
fn clear(dir: &Path) -> Result<(), AttackError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|source| AttackError::Scratch {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_holds_each_policy_with_and_without_permutation() {
        let both = Policies {
            fixed: true,
            random: true,
        };
        let settings = Setting::grid(&[1, 2], both, 30, 100).expect("grid");
        let shape: Vec<_> = settings
            .iter()
            .map(|s| (s.k1, s.policy.is_fixed(), s.obfuscation))
            .collect();
        assert_eq!(
            shape,
            [
                (1, true, Obfuscation::None),
                (1, true, Obfuscation::Permute),
                (1, false, Obfuscation::None),
                (1, false, Obfuscation::Permute),
                (2, true, Obfuscation::None),
                (2, true, Obfuscation::Permute),
                (2, false, Obfuscation::None),
                (2, false, Obfuscation::Permute),
            ]
        );
        let fixed = &settings[4];
        assert_eq!(
            fixed.knowledge,
            Knowledge {
                k1: Some(2),
                k2: Some(28),
                max_k: 2,
                budget: 100
            }
        );
        assert_eq!(fixed.policy.trunk_layers(), 2..28);
        let random = &settings[6];
        assert_eq!(
            random.knowledge,
            Knowledge {
                k1: None,
                k2: None,
                max_k: 5,
                budget: 100
            }
        );
        assert_eq!(random.policy.k1s(), [2, 3, 4, 5]);
        assert_eq!(random.policy.k2s(), [25, 26, 27, 28]);
        assert_eq!(deepest(&settings), 5);

        let random_only = Policies {
            fixed: false,
            random: true,
        };
        assert_eq!(
            Setting::grid(&[8], random_only, 30, 1).expect("grid").len(),
            2
        );
        let err = Setting::grid(&[1, 12], both, 30, 1).expect_err("too deep");
        assert_eq!(err.to_string(), "--grid-k1 12 does not fit 30 layers");
        let err = Setting::grid(&[0], both, 30, 1).expect_err("no head layer");
        assert_eq!(err.to_string(), "--grid-k1 0 does not fit 30 layers");
    }

    #[test]
    fn the_defences_are_each_a_flag_of_generate() {
        let settings = Setting::defences(30, 64).expect("defences");
        let flags: Vec<String> = settings.iter().map(|s| s.flags("DIR")).collect();
        assert_eq!(
            flags,
            [
                "",
                "--split-policy random --k1 2,3,4,5 --k2 25,26,27,28",
                "--obfuscate permute",
                "--adapter DIR",
                "--uplink-noise 0.05",
                "--uplink-noise 0.1",
                "--uplink-noise 0.2",
                "--uplink-noise 0.5",
                "--adapter DIR --uplink-noise 0.2",
                "--split-policy random --k1 2,3,4,5 --k2 25,26,27,28 --obfuscate permute \
                 --adapter DIR --uplink-noise 0.2",
            ]
        );
        let names: Vec<String> = settings.iter().map(Setting::name).collect();
        assert_eq!(
            names,
            [
                "none",
                "random",
                "permute",
                "adapter",
                "noise0.05",
                "noise0.1",
                "noise0.2",
                "noise0.5",
                "adapter+noise0.2",
                "random+permute+adapter+noise0.2",
            ]
        );
        let picked = Setting::select(settings.clone(), &["adapter", "none"]).expect("known");
        let picked: Vec<String> = picked.iter().map(|s| s.flags("DIR")).collect();
        assert_eq!(picked, ["", "--adapter DIR"], "the table's order");
        let err = Setting::select(settings.clone(), &["adapter", "noise"]).expect_err("unknown");
        assert_eq!(
            err.to_string(),
            format!(
                "--settings: no setting \"noise\"; the settings are {}",
                names.join(", ")
            )
        );
        assert_eq!(settings[0].knowledge.k1, Some(2));
        assert_eq!(settings[1].knowledge.k1, None);
        assert_eq!(settings[1].knowledge.max_k, 5);
        assert!(settings.iter().all(|s| s.knowledge.budget == 64));
        assert_eq!(settings[0].epsilon(576), None);
        let eps = settings[5].epsilon(576).expect("noise");
        assert_eq!(eps, lsplit_split::epsilon(48.0 / f64::from(0.1f32), DELTA));
        assert!(
            eps > settings[7].epsilon(576).expect("noise"),
            "more noise, less loss"
        );
        assert_eq!(
            recommended_line(&flags[5]),
            "Recommended defence: `--uplink-noise 0.1`"
        );
    }

    #[test]
    fn the_recommendation_keeps_utility_and_recovers_least() {
        let row = |defended, ppl, agree, best| Summary {
            defended,
            perplexity_ratio: ppl,
            agreement_percent: agree,
            best_prompt_percent: best,
        };
        let rows = [
            row(false, 1.0, 100.0, 100.0),
            row(true, 1.05, 95.0, 60.0),
            row(true, 1.11, 95.0, 10.0),
            row(true, 1.10, 89.9, 10.0),
            row(true, 1.10, 90.0, 40.0),
            row(true, 1.0, 100.0, 40.0),
        ];
        assert_eq!(
            Summary::pick(&rows),
            Some(4),
            "the first of the least recovered"
        );
        assert_eq!(Summary::pick(&rows[..2]), Some(1));
        assert_eq!(
            Summary::pick(&rows[..1]),
            None,
            "no defence, nothing to recommend"
        );
        let m = Measure {
            nll: 11.0,
            reference_nll: 10.0,
            predicted: 20,
            agreeing: 9,
            reference_tokens: 10,
            ..Measure::default()
        };
        assert!((m.perplexity_ratio() - 0.05f64.exp()).abs() < 1e-12);
        assert_eq!(m.agreement_percent(), 90.0);
        assert!(m.keeps_utility());
        let worse = Measure { nll: 12.0, ..m };
        assert!(!worse.keeps_utility(), "perplexity +10.5%");
    }
}
