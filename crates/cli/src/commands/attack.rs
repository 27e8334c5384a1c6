//! `lsplit attack`: what an eavesdropper who strips TLS, or the cloud operator, reads from a
//! wire capture with the public weights alone; `--table` measures it over a grid of splits
//! (the table of PRIVACY.md).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lsplit_attack::{Attacker, Knowledge, Rate, Recovery, Scores};
use lsplit_model::{ModelSource, PartKind, PartSpec, SplitPlan};
use lsplit_split::{
    CaptureWriter, DeviceModel, GenerateOptions, LocalTrunk, Obfuscation, SplitPolicy, read_capture,
};
use lsplit_tokenizer::Tokenizer;
use lsplit_wire::Codec;
use serde::{Deserialize, Serialize};

use crate::args::ModelArgs;

/// Options of `lsplit attack`.
#[derive(Debug, Args)]
pub struct AttackArgs {
    /// A capture written by `lsplit generate --capture DIR`
    #[arg(long, value_name = "DIR", required_unless_present = "table")]
    pub capture: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// The session's true tokens, from `lsplit generate --save-tokens FILE`, to score each
    /// attack's guesses against (the capture itself holds no tokens)
    #[arg(long, value_name = "FILE", conflicts_with = "table")]
    pub truth: Option<PathBuf>,
    /// The uplink's layer, when the attacker knows it (a fixed split's handshake announces
    /// the trunk's layers); unknown split points are searched up to --max-k
    #[arg(long, requires = "k2", conflicts_with = "table")]
    pub k1: Option<usize>,
    /// The downlink's layer, when the attacker knows it
    #[arg(long, requires = "k1", conflicts_with = "table")]
    pub k2: Option<usize>,
    /// Deepest boundary tried from either end when the split points are unknown
    #[arg(long, default_value_t = 4)]
    pub max_k: usize,
    /// Most candidate tokens vocabulary matching runs per position [default: the whole
    /// vocabulary, which makes it exact]
    #[arg(long)]
    pub budget: Option<usize>,
    /// Instead of one capture, generate and attack every prompt of --prompts under every
    /// split of the grid (--grid-k1: fixed and random, with and without permutation) and
    /// print the table of PRIVACY.md
    #[arg(long)]
    pub table: bool,
    /// Prompts of --table, one per line [default: the 20 built-in prompts]
    #[arg(long, value_name = "FILE", requires = "table")]
    pub prompts: Option<PathBuf>,
    /// K1 values of the --table grid: a fixed split K1:L-K1, and a random policy drawing K1
    /// from K1..K1+3 and K2 from L-K1-3..L-K1
    #[arg(
        long,
        value_name = "LIST",
        default_value = "1,2,4,8",
        requires = "table"
    )]
    pub grid_k1: String,
    /// Policies of the --table grid: fixed, random or both
    #[arg(
        long,
        value_name = "LIST",
        default_value = "fixed,random",
        requires = "table"
    )]
    pub grid_policies: String,
    /// Tokens generated per prompt by --table
    #[arg(long, default_value_t = 16, requires = "table")]
    pub max_tokens: usize,
}

/// The tokens of one session, written by `lsplit generate --save-tokens`: what the attacks
/// are scored against. It never crosses the wire.
#[derive(Debug, Serialize, Deserialize)]
pub struct Truth {
    /// The prompt's tokens (chat template included).
    pub prompt: Vec<u32>,
    /// The generated tokens.
    pub generated: Vec<u32>,
}

impl Truth {
    /// Writes the tokens as JSON.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_vec(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    fn load(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not a token file of `lsplit generate --save-tokens`",
                path.display()
            )
        })
    }
}

/// The prompts of the table: questions, instructions, personal and business text, code.
const PROMPTS: [&str; 20] = [
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

/// Runs the command.
pub fn run(args: AttackArgs) -> anyhow::Result<()> {
    let path = args.model.path()?;
    let (source, tokenizer) = args.model.open()?;
    if args.table {
        return table(&args, &source, tokenizer, &path);
    }
    let dir = args.capture.as_ref().context("--capture DIR is required")?;
    let messages =
        read_capture(dir).with_context(|| format!("reading the capture {}", dir.display()))?;
    let layers = source.config().num_layers;
    let max_k = match (args.k1, args.k2) {
        (Some(k1), Some(k2)) => {
            anyhow::ensure!(
                k1 < k2 && k2 <= layers,
                "--k1 {k1} --k2 {k2} is not a split of {layers} layers"
            );
            k1.max(layers - k2)
        }
        _ => args.max_k,
    };
    let attacker = build_attacker(&source, &tokenizer, max_k)?;
    let knowledge = Knowledge {
        k1: args.k1,
        k2: args.k2,
        max_k,
        budget: args.budget.unwrap_or(usize::MAX),
    };
    let recovery = attacker.run(&messages, &knowledge)?;
    let text = |ids: &[u32]| tokenizer.decode(ids).map_err(anyhow::Error::from);
    println!("positions: {}", recovery.matching.len());
    println!(
        "uplink rows matched exactly: {} of {}{}",
        recovery.exact_matches,
        recovery.matching.len(),
        if recovery.permutation_recovered {
            " (permutation recovered)"
        } else {
            ""
        }
    );
    println!("replay (next tokens): {:?}", text(&recovery.replay_next)?);
    println!("vocabulary matching: {:?}", text(&recovery.matching)?);
    println!("logit lens: {:?}", text(&recovery.lens)?);
    if let Some(file) = &args.truth {
        let truth = Truth::load(file)?;
        check_truth(&truth, &recovery)?;
        let scores = recovery.score(&truth.prompt, &truth.generated);
        print!("{}", score_lines(&scores));
    }
    Ok(())
}

/// Refuses a token file that is not of the captured session.
fn check_truth(truth: &Truth, recovery: &Recovery) -> anyhow::Result<()> {
    let crossed = recovery.matching.len();
    // The last generated token goes up only when an end-of-sequence token followed it.
    let all = truth.prompt.len() + truth.generated.len();
    anyhow::ensure!(
        crossed == all || crossed + 1 == all,
        "the token file holds {} prompt and {} generated tokens, so {all} or one fewer \
         positions should have crossed, but the capture holds {crossed}: it is not this \
         capture's session",
        truth.prompt.len(),
        truth.generated.len()
    );
    Ok(())
}

/// One line per attack: prompt and generated tokens recovered.
fn score_lines(scores: &Scores) -> String {
    let line = |name: &str, rate: &Rate| {
        format!(
            "{name}: prompt {}/{} ({:.1}%), generated {}/{} ({:.1}%)\n",
            rate.prompt,
            rate.prompt_total,
            rate.prompt_percent(),
            rate.generated,
            rate.generated_total,
            rate.generated_percent()
        )
    };
    [
        line("replay", &scores.replay),
        line("vocabulary matching", &scores.matching),
        line("logit lens", &scores.lens),
    ]
    .concat()
}

/// Loads the attacker's public parts and ranks the vocabulary, with a progress bar.
fn build_attacker(
    source: &ModelSource,
    tokenizer: &Tokenizer,
    max_k: usize,
) -> anyhow::Result<Attacker> {
    let progress = ProgressBar::new(source.config().vocab_size as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}")
            .context("progress bar template")?,
    );
    progress.set_message(format!("vocabulary through {max_k} layers"));
    let context = tokenizer.bos_token().unwrap_or(0);
    let attacker = Attacker::new(
        source,
        max_k,
        context,
        &candle_core::Device::Cpu,
        &mut |done, _| progress.set_position(done as u64),
    )?;
    progress.finish_and_clear();
    Ok(attacker)
}

/// One column group of the table: a split policy and whether rows are permuted.
struct Setting {
    label: String,
    policy: SplitPolicy,
    obfuscation: Obfuscation,
    knowledge: Knowledge,
}

/// Generates every prompt under every setting, attacks each capture and prints the table.
fn table(
    args: &AttackArgs,
    source: &ModelSource,
    tokenizer: Arc<Tokenizer>,
    path: &Path,
) -> anyhow::Result<()> {
    let layers = source.config().num_layers;
    let prompts: Vec<String> = match &args.prompts {
        Some(file) => std::fs::read_to_string(file)
            .with_context(|| format!("reading {}", file.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
        None => PROMPTS.iter().map(|p| p.to_string()).collect(),
    };
    anyhow::ensure!(!prompts.is_empty(), "no prompts");
    let k1s = parse_list(&args.grid_k1)?;
    let mut policies = (false, false);
    for name in args.grid_policies.split(',').map(str::trim) {
        match name {
            "fixed" => policies.0 = true,
            "random" => policies.1 = true,
            _ => anyhow::bail!("--grid-policies takes fixed and random, not {name:?}"),
        }
    }
    let mut settings = Vec::new();
    for &k1 in &k1s {
        anyhow::ensure!(
            k1 >= 1 && 2 * (k1 + 3) < layers,
            "--grid-k1 {k1} does not fit {layers} layers"
        );
        let fixed = SplitPolicy::fixed(SplitPlan::new(k1, layers - k1, layers)?);
        let random = SplitPolicy::random(
            &(k1..=k1 + 3).collect::<Vec<_>>(),
            &(layers - k1 - 3..=layers - k1).collect::<Vec<_>>(),
            layers,
        )?;
        let grid = [
            (policies.0, fixed, (Some(k1), Some(layers - k1))),
            (policies.1, random, (None, None)),
        ];
        for (policy, knowledge) in grid.into_iter().filter(|g| g.0).map(|g| (g.1, g.2)) {
            for obfuscation in [Obfuscation::None, Obfuscation::Permute] {
                settings.push(Setting {
                    label: format!("| {k1} | {policy} | {obfuscation} |"),
                    policy: policy.clone(),
                    obfuscation,
                    knowledge: Knowledge {
                        k1: knowledge.0,
                        k2: knowledge.1,
                        max_k: if knowledge.0.is_some() { k1 } else { k1 + 3 },
                        budget: args.budget.unwrap_or(usize::MAX),
                    },
                });
            }
        }
    }
    let max_k = settings
        .iter()
        .map(|s| s.knowledge.max_k)
        .max()
        .unwrap_or(0);
    let attacker = build_attacker(source, &tokenizer, max_k)?;
    let device = candle_core::Device::Cpu;
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        ..GenerateOptions::default()
    };
    let progress = ProgressBar::new((settings.len() * prompts.len()) as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
            .context("progress bar template")?,
    );
    let scratch = std::env::temp_dir().join(format!("lsplit-attack-{}", std::process::id()));
    let mut out = String::new();
    writeln!(
        out,
        "Model {}, {} prompts, {} generated tokens at most each, greedy, f32 on the wire.\n",
        path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned()
        ),
        prompts.len(),
        args.max_tokens
    )?;
    writeln!(
        out,
        "| k1 | split | obfuscation | replay prompt | replay generated | matching prompt | \
         matching generated | logit lens prompt | logit lens generated |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|")?;
    for setting in &settings {
        progress.set_message(setting.label.clone());
        let trunk = Arc::new(source.load_part(
            &PartSpec {
                kind: PartKind::Trunk,
                layers: setting.policy.trunk_layers(),
            },
            &device,
        )?);
        let model = DeviceModel::split(
            source,
            setting.policy.clone(),
            Arc::clone(&tokenizer),
            Codec::F32,
            &device,
        )?;
        let mut total = Scores::default();
        for prompt in &prompts {
            let keys = model.new_keys(setting.obfuscation)?;
            let mut session =
                model.session(Box::new(LocalTrunk::new(Arc::clone(&trunk), &keys)?), &keys)?;
            if scratch.exists() {
                std::fs::remove_dir_all(&scratch)?;
            }
            session.capture(CaptureWriter::create(&scratch)?);
            let tokens = model.prompt_tokens(prompt, false)?;
            let generation = session.generate(&tokens, &options, &mut |_| {})?;
            drop(session);
            let messages = read_capture(&scratch)?;
            let recovery = attacker.run(&messages, &setting.knowledge)?;
            let scores = recovery.score(&tokens, &generation.tokens);
            total.replay.add(scores.replay);
            total.matching.add(scores.matching);
            total.lens.add(scores.lens);
            progress.inc(1);
        }
        let cell = |r: &Rate| format!("{:.1}% | {:.1}%", r.prompt_percent(), r.generated_percent());
        let row = format!(
            "{} {} | {} | {} |",
            setting.label,
            cell(&total.replay),
            cell(&total.matching),
            cell(&total.lens)
        );
        progress.suspend(|| eprintln!("{row}"));
        writeln!(out, "{row}")?;
    }
    progress.finish_and_clear();
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }
    print!("{out}");
    Ok(())
}

/// `1,2,4,8` as numbers.
fn parse_list(text: &str) -> anyhow::Result<Vec<usize>> {
    text.split(',')
        .map(|v| {
            v.trim()
                .parse()
                .with_context(|| format!("{v:?} in {text:?} is not a layer number"))
        })
        .collect()
}
