//! The table of PRIVACY.md: every prompt generated greedily through a keyed session under each
//! setting of a grid of splits (fixed and random split points, rows permuted or not), each
//! wire capture attacked, and the recovery rates summed per setting.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use lsplit_model::{ModelSource, PartKind, PartSpec, SplitPlan};
use lsplit_split::{
    CaptureWriter, DeviceModel, GenerateOptions, Obfuscation, SplitPolicy, read_capture,
};
use lsplit_tokenizer::Tokenizer;
use lsplit_wire::Codec;

use crate::{AttackError, Attacker, Knowledge, Scores};

/// The prompts of the table: questions, instructions, personal and business text, code.
pub const PROMPTS: [&str; 20] = [
    "What is the capital of France?",
    "List three uses of copper.",
    "Write one sentence about the sea.",
    "My doctor says my blood pressure is 150 over 95. Is that bad?",
    "Translate 'good morning' into Spanish.",
    "Write a Python function that reverses a string.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do I reset my bank account password?",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Draft an email telling my manager I will be late tomorrow.",
    "What are the symptoms of the flu?",
    "Explain recursion to a child.",
    "My name is Alice Martin and I live at 12 Rue Lepic, Paris. Write me a short bio.",
    "Suggest a name for a coffee shop.",
    "What is 17 times 23?",
    "Write a haiku about autumn.",
    "How can I improve my credit score?",
    "Describe the water cycle.",
    "Our quarterly revenue fell 12 percent. Write a note to investors.",
];

/// One column group of the table: a split policy, whether rows are permuted, and what the
/// attacker knows of the split points.
#[derive(Debug, Clone)]
pub struct Setting {
    /// The grid's K1 this setting was made from.
    pub k1: usize,
    /// The split policy of the sessions.
    pub policy: SplitPolicy,
    /// Whether the sessions permute their rows.
    pub obfuscation: Obfuscation,
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

impl Setting {
    /// The settings of the grid over `k1s` for a model of `layers` layers, each without and
    /// with permutation; vocabulary matching tries at most `budget` tokens per position.
    pub fn grid(
        k1s: &[usize],
        policies: Policies,
        layers: usize,
        budget: usize,
    ) -> Result<Vec<Self>, AttackError> {
        let mut settings = Vec::new();
        for &k1 in k1s {
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
            let grid = [
                (policies.fixed, fixed, (Some(k1), Some(layers - k1))),
                (policies.random, random, (None, None)),
            ];
            for (policy, known) in grid.into_iter().filter(|g| g.0).map(|g| (g.1, g.2)) {
                for obfuscation in [Obfuscation::None, Obfuscation::Permute] {
                    settings.push(Self {
                        k1,
                        policy: policy.clone(),
                        obfuscation,
                        knowledge: Knowledge {
                            k1: known.0,
                            k2: known.1,
                            max_k: if known.0.is_some() { k1 } else { k1 + 3 },
                            budget,
                        },
                    });
                }
            }
        }
        Ok(settings)
    }
}

/// The deepest boundary any of `settings` searches: how deep the [`Attacker`] must reach.
pub fn deepest(settings: &[Setting]) -> usize {
    settings
        .iter()
        .map(|s| s.knowledge.max_k)
        .max()
        .unwrap_or(0)
}

/// A run of the table: the model, the prompts and how long each generation is.
pub struct Table<'a> {
    /// The public model, whose parts every session and the attacker load.
    pub source: &'a ModelSource,
    /// The model's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The prompts generated under each setting ([`PROMPTS`] by default).
    pub prompts: Vec<String>,
    /// Greedy tokens generated at most per prompt.
    pub max_tokens: usize,
    /// Where each session's wire capture is written (emptied before each, removed at the end).
    pub scratch: PathBuf,
}

impl Table<'_> {
    /// Generates every prompt under every setting (f32 on the wire), attacks each capture with
    /// `attacker` (deep enough for [`deepest`]`(settings)`), and returns each setting's
    /// summed scores; `on_prompt` is called after each prompt, `on_row` after each setting.
    pub fn run(
        &self,
        attacker: &Attacker,
        settings: &[Setting],
        on_prompt: &mut dyn FnMut(&Setting),
        on_row: &mut dyn FnMut(&Setting, &Scores),
    ) -> Result<Vec<Scores>, AttackError> {
        let device = Device::Cpu;
        let options = GenerateOptions {
            max_tokens: self.max_tokens,
            ..GenerateOptions::default()
        };
        let mut rows = Vec::with_capacity(settings.len());
        for setting in settings {
            let trunk = Arc::new(self.source.load_part(
                &PartSpec {
                    kind: PartKind::Trunk,
                    layers: setting.policy.trunk_layers(),
                },
                &device,
            )?);
            let model = DeviceModel::split(
                self.source,
                setting.policy.clone(),
                Arc::clone(&self.tokenizer),
                Codec::F32,
                &device,
            )?;
            let mut total = Scores::default();
            for prompt in &self.prompts {
                let mut session = model.local_session(&trunk, setting.obfuscation)?;
                clear(&self.scratch)?;
                session.capture(CaptureWriter::create(&self.scratch)?);
                let tokens = model.prompt_tokens(prompt, false)?;
                let generation = session.generate(&tokens, &options, &mut |_| {})?;
                drop(session);
                let messages = read_capture(&self.scratch)?;
                let recovery = attacker.run(&messages, &setting.knowledge)?;
                let scores = recovery.score(&tokens, &generation.tokens);
                total.replay.add(scores.replay);
                total.matching.add(scores.matching);
                total.lens.add(scores.lens);
                total.inversion.add(scores.inversion);
                on_prompt(setting);
            }
            on_row(setting, &total);
            rows.push(total);
        }
        clear(&self.scratch)?;
        Ok(rows)
    }
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
}
