//! `lsplit attack`: what an eavesdropper who strips TLS, or the cloud operator, reads from a
//! wire capture with the public weights alone; `--table` measures it under every defence, or
//! over a grid of splits with `--grid-k1` (the tables of PRIVACY.md).
//!
//! With `--adapter DIR`, `--table`'s private adapter is that device adapter (the defences
//! table otherwise generates a random one; the grid's sessions all run it) while the attacker
//! still holds only the public weights (what a private adapter is worth); attacking one
//! `--capture`, the attacker is given the adapter (what a leaked one exposes).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lsplit_attack::adapter::write_random_adapter;
use lsplit_attack::table::{self, Measure, Policies, Setting, Table};
use lsplit_attack::{
    Attacker, DEFAULT_DECODER_STEPS, DEFAULT_INVERSION_BUDGET, DecoderOptions, DraftScores,
    Knowledge, Options, Rate, Rejected, Scores, Truth, corpus_tokens, template_prefix,
};
use lsplit_model::ModelSource;
use lsplit_split::read_capture;
use lsplit_tokenizer::Tokenizer;

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
    /// Try every candidate of the budget at every position, even after one reproduced the
    /// row: the guess is then the nearest of them all (slow; by default trying stops at a
    /// reproduced row, which gives the same guesses)
    #[arg(long)]
    pub exhaustive: bool,
    /// Most candidate tokens downlink inversion runs per position (each through K2 layers)
    #[arg(long, default_value_t = DEFAULT_INVERSION_BUDGET)]
    pub inversion_budget: usize,
    /// Steps of training of the learned decoder, an MLP the attacker trains on rows it makes
    /// itself (its own text through the public head, with adapters and noise of its own);
    /// 0: no decoder
    #[arg(long, default_value_t = DEFAULT_DECODER_STEPS)]
    pub decoder_steps: usize,
    /// Seed of the learned decoder's training: the same seed gives the same decoder
    #[arg(long, default_value_t = 0)]
    pub decoder_seed: u64,
    /// Instead of one capture, generate and attack every prompt of --prompts under every
    /// defence (random split points, the permutation, a private adapter, uplink noise, and
    /// combinations) and print the table of PRIVACY.md: each attack's recovery, the utility
    /// left, the cost, and the recommended defence (chosen on the first half of the prompts,
    /// measured on the held-out half)
    #[arg(long)]
    pub table: bool,
    /// Prompts of --table, one per line; the first half tunes, the second is held out
    /// [default: the 20 built-in prompts]
    #[arg(long, value_name = "FILE", requires = "table")]
    pub prompts: Option<PathBuf>,
    /// Instead of the defences, the grid of splits: for each K1 of LIST (e.g. 1,2,4,8) a fixed
    /// split K1:L-K1, and a random policy drawing K1 from K1..K1+3 and K2 from L-K1-3..L-K1,
    /// each with and without permutation
    #[arg(long, value_name = "LIST", requires = "table")]
    pub grid_k1: Option<String>,
    /// Policies of the --table grid: fixed, random or both
    #[arg(
        long,
        value_name = "LIST",
        default_value = "fixed,random",
        requires = "table"
    )]
    pub grid_policies: String,
    /// Only these settings of the defences table, by name, comma-separated: none, random,
    /// permute, adapter, noise0.05, noise0.1, noise0.2, noise0.5, adapter+noise0.2,
    /// random+permute+adapter+noise0.2 [default: all]
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        requires = "table",
        conflicts_with = "grid_k1"
    )]
    pub settings: Vec<String>,
    /// Tokens generated per prompt by --table
    #[arg(long, default_value_t = 8, requires = "table")]
    pub max_tokens: usize,
    /// Write the defences table's held-out rows as CSV to FILE, for `bench/frontier.py` to
    /// plot (its prompt percentages count the user's own text, as the table's cells do)
    #[arg(
        long,
        value_name = "FILE",
        requires = "table",
        conflicts_with = "grid_k1"
    )]
    pub csv: Option<PathBuf>,
}

/// Candidates vocabulary matching tries per position in the defences table unless --budget
/// says otherwise: noisy rows never reproduce exactly, so every position spends its budget.
const DEFENCES_BUDGET: usize = 256;

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
    let mut attacker = build_attacker(&source, &tokenizer, max_k)?;
    let knowledge = Knowledge {
        k1: args.k1,
        k2: args.k2,
        max_k,
        budget: args.budget.unwrap_or(usize::MAX),
    };
    train_decoders(
        &args,
        &mut attacker,
        &tokenizer,
        std::slice::from_ref(&knowledge),
    )?;
    let options = Options {
        exhaustive: args.exhaustive,
        known_prefix: template_prefix(&tokenizer)?,
        inversion_budget: args.inversion_budget,
    };
    let recovery = attacker.run_with(&messages, &knowledge, &options)?;
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
    println!(
        "downlink rows matched exactly: {} of {}",
        recovery.inverted_exactly,
        recovery.inversion.len()
    );
    println!("downlink inversion: {:?}", text(&recovery.inversion)?);
    if !recovery.known_plaintext.is_empty() {
        println!("known plaintext: {:?}", text(&recovery.known_plaintext)?);
    }
    if !recovery.decoder.is_empty() {
        println!("learned decoder: {:?}", text(&recovery.decoder)?);
    }
    let rejected = &recovery.rejected;
    if !rejected.positions.is_empty() {
        println!(
            "uplink rows rewound (rejected drafts): {}, matched exactly: {}",
            rejected.positions.len(),
            rejected.exact_matches
        );
        println!(
            "rejected drafts, vocabulary matching: {}",
            draft_runs(rejected, &text)?
        );
    }
    if let Some(file) = &args.truth {
        let truth = Truth::load(file)?;
        truth.check(&recovery)?;
        let user = lsplit_attack::user_text(&tokenizer, &truth.prompt)?;
        let scores = recovery.score(&truth.prompt, &truth.generated, user);
        print!("{}", score_lines(&scores));
        match truth.score_drafts(&recovery)? {
            Some(drafts) if drafts.total > 0 => print!("{}", draft_lines(&drafts)),
            Some(_) => {}
            None if rejected.positions.is_empty() => {}
            None => eprintln!(
                "{} records no drafts (written before `lsplit generate --save-tokens` recorded \
                 them): the rewound rows are not scored",
                file.display()
            ),
        }
    }
    Ok(())
}

/// Vocabulary matching's reading of the rewound rows: each run of consecutive positions as
/// text, after its first position (`@70 " the"`).
fn draft_runs(
    rejected: &Rejected,
    text: &dyn Fn(&[u32]) -> anyhow::Result<String>,
) -> anyhow::Result<String> {
    let mut runs: Vec<String> = Vec::new();
    let mut first = 0;
    for i in 1..=rejected.positions.len() {
        let ends = rejected
            .positions
            .get(i)
            .is_none_or(|&p| p != rejected.positions[i - 1] + 1);
        if ends {
            runs.push(format!(
                "@{} {:?}",
                rejected.positions[first],
                text(&rejected.matching[first..i])?
            ));
            first = i;
        }
    }
    Ok(runs.join(", "))
}

/// One line for the rejected drafted rows, then one per uplink attack that ran: the rows whose
/// drafted token it named exactly.
fn draft_lines(drafts: &DraftScores) -> String {
    let line = |name: &str, read: usize| {
        format!(
            "{name}: rejected drafts {read}/{} ({:.1}%)\n",
            drafts.total,
            100.0 * read as f64 / drafts.total.max(1) as f64
        )
    };
    let mut lines = format!(
        "rejected drafted rows: {} crossed ({} rewound on the wire, {} never rewound)\n",
        drafts.total,
        drafts.rewound,
        drafts.total - drafts.rewound
    );
    lines.push_str(&line("vocabulary matching", drafts.matching));
    lines.push_str(&line("logit lens", drafts.lens));
    if let Some(read) = drafts.known_plaintext {
        lines.push_str(&line("known plaintext", read));
    }
    if let Some(read) = drafts.decoder {
        lines.push_str(&line("learned decoder", read));
    }
    lines
}

/// One line per attack: prompt and generated tokens recovered, and of the prompt the user's
/// own text (less the chat template's public tokens).
fn score_lines(scores: &Scores) -> String {
    let line = |name: &str, rate: &Rate| {
        format!(
            "{name}: prompt {}/{} ({:.1}%), generated {}/{} ({:.1}%), user text {}/{} ({:.1}%)\n",
            rate.prompt,
            rate.prompt_total,
            rate.prompt_percent(),
            rate.generated,
            rate.generated_total,
            rate.generated_percent(),
            rate.user,
            rate.user_total,
            rate.user_percent()
        )
    };
    [
        line("replay", &scores.replay),
        line("vocabulary matching", &scores.matching),
        line("logit lens", &scores.lens),
        line("downlink inversion", &scores.inversion),
        line("known plaintext", &scores.known_plaintext),
        line("learned decoder", &scores.decoder),
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

/// Trains the learned decoder for each of `knowledge` (once per set of boundaries), with a
/// progress bar; nothing with `--decoder-steps 0`.
fn train_decoders(
    args: &AttackArgs,
    attacker: &mut Attacker,
    tokenizer: &Tokenizer,
    knowledge: &[Knowledge],
) -> anyhow::Result<()> {
    if args.decoder_steps == 0 {
        return Ok(());
    }
    let options = DecoderOptions {
        steps: args.decoder_steps,
        seed: args.decoder_seed,
    };
    let texts = corpus_tokens(tokenizer)?;
    let progress = ProgressBar::new(args.decoder_steps as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
            .context("progress bar template")?,
    );
    for k in knowledge {
        progress.set_message(match k.k1 {
            Some(k1) => format!("learned decoder at K1 = {k1}"),
            None => format!("learned decoder up to {}", k.max_k),
        });
        progress.set_position(0);
        attacker.train_decoder(&texts, k, &options, &mut |done, _| {
            progress.set_position(done as u64)
        })?;
    }
    progress.finish_and_clear();
    Ok(())
}

/// The table's prompts: --prompts, or the built-in ones.
fn prompts(args: &AttackArgs) -> anyhow::Result<Vec<String>> {
    let prompts: Vec<String> = match &args.prompts {
        Some(file) => std::fs::read_to_string(file)
            .with_context(|| format!("reading {}", file.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
        None => table::PROMPTS.iter().map(|p| p.to_string()).collect(),
    };
    anyhow::ensure!(!prompts.is_empty(), "no prompts");
    Ok(prompts)
}

/// A progress bar over `len` generations.
fn bar(len: usize) -> anyhow::Result<ProgressBar> {
    Ok(ProgressBar::new(len as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
            .context("progress bar template")?,
    ))
}

/// The model file's name, for the table's caption.
fn model_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Generates every prompt under every setting (the defences, or the grid of splits), attacks
/// each capture and prints the table.
fn table(
    args: &AttackArgs,
    source: &ModelSource,
    tokenizer: Arc<Tokenizer>,
    path: &Path,
) -> anyhow::Result<()> {
    let layers = source.config().num_layers;
    let prompts = prompts(args)?;
    let mut public = ModelSource::open(path)?;
    public.set_kv_precision(args.model.kv_cache);
    let scratch = std::env::temp_dir().join(format!("lsplit-attack-{}", std::process::id()));
    let Some(grid_k1) = &args.grid_k1 else {
        return defences(args, &public, tokenizer, path, prompts, &scratch);
    };
    let k1s = parse_list(grid_k1)?;
    let mut policies = Policies {
        fixed: false,
        random: false,
    };
    for name in args.grid_policies.split(',').map(str::trim) {
        match name {
            "fixed" => policies.fixed = true,
            "random" => policies.random = true,
            _ => anyhow::bail!("--grid-policies takes fixed and random, not {name:?}"),
        }
    }
    let settings = Setting::grid(&k1s, policies, layers, args.budget.unwrap_or(usize::MAX))?;
    let attacker = build_attacker(&public, &tokenizer, table::deepest(&settings))?;
    let progress = bar(settings.len() * prompts.len())?;
    let mut out = String::new();
    writeln!(
        out,
        "Model {}, {} prompts, {} generated tokens at most each, greedy, f32 on the wire.\n",
        model_name(path),
        prompts.len(),
        args.max_tokens
    )?;
    writeln!(
        out,
        "| k1 | split | obfuscation | replay prompt | replay generated | matching prompt | \
         matching generated | logit lens prompt | logit lens generated | downlink inversion \
         prompt | downlink inversion generated |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    let label = |s: &Setting| format!("| {} | {} | {} |", s.k1, s.policy, s.obfuscation);
    let run = Table {
        source,
        adapted: None,
        tokenizer,
        prompts,
        max_tokens: args.max_tokens,
        inversion_budget: args.inversion_budget,
        scratch,
    };
    if let Some(first) = settings.first() {
        progress.set_message(label(first));
    }
    let mut rows = Vec::new();
    run.run(
        &attacker,
        &settings,
        &mut |setting| {
            progress.set_message(label(setting));
            progress.inc(1);
        },
        &mut |setting, measures| {
            let total = Measure::total(measures).scores;
            let cell =
                |r: &Rate| format!("{:.1}% | {:.1}%", r.prompt_percent(), r.generated_percent());
            let row = format!(
                "{} {} | {} | {} | {} |",
                label(setting),
                cell(&total.replay),
                cell(&total.matching),
                cell(&total.lens),
                cell(&total.inversion)
            );
            progress.suspend(|| eprintln!("{row}"));
            rows.push(row);
        },
    )?;
    progress.finish_and_clear();
    for row in rows {
        writeln!(out, "{row}")?;
    }
    print!("{out}");
    Ok(())
}

/// The defences table: every defence at 2:28 over the prompts, the first half choosing the
/// recommended setting and the held-out half measuring it.
fn defences(
    args: &AttackArgs,
    public: &ModelSource,
    tokenizer: Arc<Tokenizer>,
    path: &Path,
    prompts: Vec<String>,
    scratch: &Path,
) -> anyhow::Result<()> {
    let config = public.config().clone();
    let budget = args.budget.unwrap_or(DEFENCES_BUDGET);
    let mut settings = Setting::defences(config.num_layers, budget)?;
    if !args.settings.is_empty() {
        let names: Vec<&str> = args.settings.iter().map(|n| n.trim()).collect();
        settings = Setting::select(settings, &names)?;
    }
    let mut adapted = ModelSource::open(path)?;
    adapted.set_kv_precision(args.model.kv_cache);
    let generated = scratch.with_extension("adapter");
    let adapter_dir = match &args.model.adapter {
        Some(dir) => dir.clone(),
        None => {
            let layers = [0, 1, config.num_layers - 2, config.num_layers - 1];
            write_random_adapter(&generated, &config, &layers, table::ADAPTER_STRENGTH, 20)?;
            generated.clone()
        }
    };
    adapted.load_adapter(&adapter_dir)?;
    let mut attacker = build_attacker(public, &tokenizer, table::deepest(&settings))?;
    let knowledge: Vec<Knowledge> = settings.iter().map(|s| s.knowledge.clone()).collect();
    train_decoders(args, &mut attacker, &tokenizer, &knowledge)?;
    let tuning = prompts.len() / 2;
    let run = Table {
        source: public,
        adapted: Some(&adapted),
        tokenizer,
        max_tokens: args.max_tokens,
        inversion_budget: args.inversion_budget,
        scratch: scratch.to_path_buf(),
        prompts,
    };
    let progress = bar(settings.len() * run.prompts.len())?;
    let flags = |s: &Setting| s.flags("DIR");
    if let Some(first) = settings.first() {
        progress.set_message(flags(first));
    }
    let rows = run.run(
        &attacker,
        &settings,
        &mut |setting| {
            progress.set_message(flags(setting));
            progress.inc(1);
        },
        &mut |setting, measures| {
            let held_out = Measure::total(&measures[tuning..]);
            let row = table::defence_row(
                &flags(setting),
                setting.epsilon(config.hidden_size),
                &held_out,
            );
            progress.suspend(|| eprintln!("{row}"));
        },
    )?;
    progress.finish_and_clear();
    if args.model.adapter.is_none() {
        std::fs::remove_dir_all(&generated).ok();
    }
    let halves: Vec<(Measure, Measure)> = rows
        .iter()
        .map(|m| (Measure::total(&m[..tuning]), Measure::total(&m[tuning..])))
        .collect();
    let mut out = String::new();
    writeln!(
        out,
        "Model {}, split 2:28, {} prompts ({tuning} tuning, {} held out), {} greedy tokens at \
         most each, f32 on the wire; matching tries {budget} candidates per position, downlink \
         inversion {}. Cells of attacks: the user's own prompt text (the prompt less the chat \
         template's public tokens) / generated tokens recovered. epsilon: the \
         noise's worst case between two rows at delta = {:e}. The private adapter (DIR): {}.\n",
        model_name(path),
        run.prompts.len(),
        run.prompts.len() - tuning,
        args.max_tokens,
        args.inversion_budget,
        table::DELTA,
        match &args.model.adapter {
            Some(dir) => dir.display().to_string(),
            None => format!(
                "random, rank {}, strength {}, on layers 0, 1, {} and {}",
                lsplit_attack::adapter::RANK,
                table::ADAPTER_STRENGTH,
                config.num_layers - 2,
                config.num_layers - 1
            ),
        }
    )?;
    for (title, pick) in [("Held-out prompts", 1), ("Tuning prompts", 0)] {
        writeln!(out, "{title}:\n\n{}", table::DEFENCES_HEADER)?;
        writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
        for (setting, half) in settings.iter().zip(&halves) {
            let m = if pick == 1 { &half.1 } else { &half.0 };
            writeln!(
                out,
                "{}",
                table::defence_row(&flags(setting), setting.epsilon(config.hidden_size), m)
            )?;
        }
        writeln!(out)?;
    }
    let tuning_measures: Vec<Measure> = halves.iter().map(|h| h.0).collect();
    match table::recommend(&settings, &tuning_measures) {
        Some(best) => {
            let held_out = &halves[best].1;
            writeln!(
                out,
                "{}\n",
                table::recommended_line(&flags(&settings[best]))
            )?;
            let reached =
                held_out.keeps_utility() && held_out.best_prompt_attack().0 < table::GOAL_PERCENT;
            writeln!(
                out,
                "Goal (perplexity within +10%, greedy agreement >= 90%, best attack's prompt \
                 recovery < {}%) on the held-out prompts: {}",
                table::GOAL_PERCENT,
                if reached { "reached" } else { "not reached" }
            )?;
        }
        None => writeln!(
            out,
            "No defended setting keeps perplexity within +10% and greedy agreement >= 90% on \
             the tuning prompts: no defence to recommend."
        )?,
    }
    if let Some(file) = &args.csv {
        let mut csv = String::from(
            "flags,epsilon,perplexity_ratio,agreement_percent,best_prompt_percent,decoder_prompt_percent\n",
        );
        for (setting, half) in settings.iter().zip(&halves) {
            writeln!(
                csv,
                "\"{}\",{},{},{},{},{}",
                flags(setting),
                setting.epsilon(config.hidden_size).unwrap_or(f64::INFINITY),
                half.1.perplexity_ratio(),
                half.1.agreement_percent(),
                half.1.best_prompt_attack().0,
                half.1.scores.decoder.user_percent()
            )?;
        }
        std::fs::write(file, csv).with_context(|| format!("writing {}", file.display()))?;
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
