//! The defences as a user runs them on the real default model: `--uplink-noise` changes the
//! uplink rows by exactly what it says (σ times each row's RMS, clipped, repeatable from
//! `--noise-seed`), bad settings are refused, the help says what the measurements support, and
//! PRIVACY.md's recommended defence is a row of its own table, chosen by the table's rule, and a
//! working set of `lsplit generate` flags.

mod common;

use std::path::Path;

use common::{lsplit, model, stderr, stdout};
use lsplit_attack::table::{self, Summary};
use lsplit_split::{Way, read_capture};

const PROMPT: &str = "My bank PIN is 4921 and my sister's name is Aiko. Remind me of both.";

/// Generates 3 tokens with `extra`, capturing into `dir`; returns stdout.
fn generate(dir: &Path, extra: &[&str]) -> String {
    let model = model();
    let capture = dir.display().to_string();
    let mut args = vec![
        "generate",
        PROMPT,
        "--model",
        &model,
        "--max-tokens",
        "3",
        "--capture",
        &capture,
    ];
    args.extend_from_slice(extra);
    let out = lsplit(&args);
    assert!(out.status.success(), "{extra:?}: {}", stderr(&out));
    stdout(&out)
}

/// The rows of the capture's first uplink message (the prompt's).
fn prompt_rows(dir: &Path) -> Vec<Vec<f32>> {
    let messages = read_capture(dir).expect("capture");
    let first = messages
        .iter()
        .find(|m| m.direction == Way::Up)
        .expect("an uplink message");
    first
        .rows
        .decode(&candle_core::Device::Cpu)
        .expect("decode")
        .to_vec2()
        .expect("rows")
}

fn rms(row: &[f32]) -> f64 {
    (row.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / row.len() as f64).sqrt()
}

#[test]
fn uplink_noise_is_relative_to_each_row_clipped_and_repeats_from_its_seed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let at = |name: &str| dir.path().join(name);
    generate(&at("clean"), &[]);
    let noisy = ["--uplink-noise", "0.2", "--noise-seed", "5"];
    let first = generate(&at("a"), &noisy);
    let again = generate(&at("b"), &noisy);
    generate(&at("c"), &["--uplink-noise", "0.2", "--noise-seed", "6"]);
    let up = |name: &str| std::fs::read(at(name).join("up.bin")).expect("up.bin");
    assert_eq!(up("a"), up("b"), "the same seed, the same noise");
    assert_eq!(first, again);
    assert_ne!(up("a"), up("c"), "another seed, other noise");

    let clean = prompt_rows(&at("clean"));
    let noised = prompt_rows(&at("a"));
    assert_eq!(clean.len(), noised.len());
    for (c, n) in clean.iter().zip(&noised) {
        let added: Vec<f32> = n.iter().zip(c).map(|(n, c)| n - c).collect();
        // 576 draws: the added noise's RMS is 0.2 times the row's within a few percent.
        let ratio = rms(&added) / (0.2 * rms(c));
        assert!((0.85..1.15).contains(&ratio), "ratio {ratio}");
    }

    // Clipped to an RMS below every row's: each row sent is the clipped row plus noise of
    // 0.2 times the clip, so its RMS is about √(1 + 0.2²) times the clip.
    let clip = clean.iter().map(|r| rms(r)).fold(f64::INFINITY, f64::min) / 2.0;
    let clip_text = format!("{clip}");
    generate(
        &at("clipped"),
        &[
            "--uplink-noise",
            "0.2",
            "--uplink-clip",
            &clip_text,
            "--noise-seed",
            "5",
        ],
    );
    for row in prompt_rows(&at("clipped")) {
        let ratio = rms(&row) / (clip * (1.0f64 + 0.04).sqrt());
        assert!((0.9..1.1).contains(&ratio), "ratio {ratio}");
    }
}

#[test]
fn bad_noise_settings_are_refused_with_the_reason() {
    let model = model();
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "hi", "--model", &model, "--max-tokens", "1"];
        args.extend_from_slice(extra);
        let out = lsplit(&args);
        assert!(!out.status.success(), "{extra:?} was accepted");
        stderr(&out)
    };
    assert!(
        run(&["--uplink-noise", "0"])
            .contains("--uplink-noise must be a number in (0, 10000], not 0")
    );
    assert!(
        run(&["--uplink-noise", "0.1", "--uplink-clip=-1"])
            .contains("--uplink-clip must be a positive finite RMS, not -1")
    );
    assert!(run(&["--uplink-clip", "1"]).contains("--uplink-noise <SIGMA>"));
    assert!(
        run(&["--uplink-noise", "0.1", "--no-split"])
            .contains("uplink noise needs a split: the unsplit model sends nothing")
    );
}

#[test]
fn the_help_says_what_the_measurements_support() {
    let help = stdout(&lsplit(&["generate", "--help"]));
    let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat.contains("The permutation is broken from one row"),
        "{help}"
    );
    assert!(flat.contains("--uplink-noise <SIGMA>"), "{help}");
    let top = stdout(&lsplit(&["--help"]));
    let first = top.lines().next().expect("a first line");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README");
    let claim = readme
        .lines()
        .nth(2)
        .expect("the README's first line of text");
    assert!(
        first.contains("does not hide the text from the trunk's operator"),
        "{first}"
    );
    assert!(
        claim.contains("does not hide the text from the trunk's operator"),
        "{claim}"
    );
    let never = readme
        .lines()
        .find(|l| l.contains("never token ids"))
        .expect("the line on what crosses");
    assert!(
        never.contains("PRIVACY.md"),
        "the caveat is on the same line: {never}"
    );
}

/// The cells of each row of the table under `title` in PRIVACY.md.
fn rows<'a>(privacy: &'a str, title: &str) -> Vec<Vec<&'a str>> {
    let start = privacy
        .find(&format!("{title}:\n\n{}", table::DEFENCES_HEADER))
        .unwrap_or_else(|| panic!("PRIVACY.md has no `{title}` table with the table's columns"));
    privacy[start..]
        .lines()
        .skip(4)
        .take_while(|l| l.starts_with("| `"))
        .map(|l| l.trim_matches('|').split(" | ").map(str::trim).collect())
        .collect()
}

fn percent(cell: &str) -> f64 {
    cell.split('%')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("not a percentage: {cell}"))
}

#[test]
fn privacy_md_recommends_the_setting_its_table_chooses() {
    let privacy = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../PRIVACY.md"))
        .expect("PRIVACY.md");
    let lines: Vec<&str> = privacy
        .lines()
        .filter(|l| l.starts_with("Recommended defence:"))
        .collect();
    assert_eq!(lines.len(), 1, "one recommended defence: {lines:?}");
    let flags = lines[0]
        .strip_prefix("Recommended defence: `")
        .and_then(|f| f.strip_suffix('`'))
        .expect("the line's exact form");
    assert_eq!(lines[0], table::recommended_line(flags));

    let tuning = rows(&privacy, "Tuning prompts");
    let held_out = rows(&privacy, "Held-out prompts");
    assert!(tuning.len() >= 10, "{tuning:?}");
    let names = |rows: &[Vec<&str>]| rows.iter().map(|r| r[0].to_string()).collect::<Vec<_>>();
    assert_eq!(names(&tuning), names(&held_out));
    let summaries: Vec<Summary> = tuning
        .iter()
        .map(|r| Summary {
            defended: r[0] != "`(none)`",
            perplexity_ratio: 1.0 + percent(r[2]) / 100.0,
            agreement_percent: percent(r[3]),
            best_prompt_percent: percent(r[9]),
        })
        .collect();
    let chosen = Summary::pick(&summaries).expect("a setting keeps utility");
    assert_eq!(tuning[chosen][0], format!("`{flags}`"));

    // The flags work: `lsplit generate` runs with them (DIR: a private adapter).
    let dir = tempfile::tempdir().expect("tempdir");
    let source = lsplit_model::ModelSource::open(Path::new(&model())).expect("model");
    let config = source.config();
    let layers = [0, 1, config.num_layers - 2, config.num_layers - 1];
    lsplit_attack::adapter::write_random_adapter(dir.path(), config, &layers, 0.1, 1)
        .expect("adapter");
    let flags = flags.replace("DIR", &dir.path().display().to_string());
    let model = model();
    let mut args = vec!["generate", "hi", "--model", &model, "--max-tokens", "2"];
    args.extend(flags.split_whitespace());
    let out = lsplit(&args);
    assert!(out.status.success(), "{flags}: {}", stderr(&out));
}
