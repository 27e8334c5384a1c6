//! `lsplit generate` with random split points, the permutation and a wire capture, as a user
//! runs them on the real default model.

mod common;

use std::process::Output;

use common::{lsplit, model, stderr, stdout};

const PROMPT: &str = "Write one sentence about the sea.";

fn generate(extra: &[&str]) -> Output {
    let model = model();
    let mut args = vec!["generate", PROMPT, "--model", &model, "--max-tokens", "16"];
    args.extend_from_slice(extra);
    lsplit(&args)
}

/// The value before `label` on the stats line that starts with `line`.
fn stat(err: &str, line: &str, label: &str) -> u64 {
    let text = err
        .lines()
        .find(|l| l.starts_with(line))
        .unwrap_or_else(|| panic!("no `{line}` line in {err}"));
    let before = &text[..text
        .find(label)
        .unwrap_or_else(|| panic!("no {label} in {text}"))];
    before
        .split(|c: char| !c.is_ascii_digit())
        .rfind(|w| !w.is_empty())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number before {label} in {text}"))
}

#[test]
fn random_split_points_and_permutation_print_the_unsplit_text() {
    let baseline = generate(&["--no-split"]);
    assert!(baseline.status.success(), "{}", stderr(&baseline));
    let fixed = generate(&["--split", "4:26", "--stats"]);
    assert!(fixed.status.success(), "{}", stderr(&fixed));
    assert_eq!(stdout(&fixed), stdout(&baseline));
    let random = [
        "--split-policy",
        "random",
        "--k1",
        "1,2,3,4",
        "--k2",
        "26,27,28,29",
    ];
    for extra in [&[][..], &["--obfuscate", "permute"][..]] {
        let mut args = random.to_vec();
        args.extend_from_slice(extra);
        args.push("--stats");
        let out = generate(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), stdout(&baseline), "{args:?}");
        let err = stderr(&out);
        let obfuscation = if extra.is_empty() { "none" } else { "permute" };
        assert!(
            err.contains(&format!(
                "split: random K1 {{1,2,3,4}} K2 {{26,27,28,29}}, obfuscation {obfuscation}"
            )),
            "{err}"
        );
        // Catch-up costs bytes and compute beyond the fixed split's.
        let fixed_err = stderr(&fixed);
        assert!(stat(&err, "wire:", "B up,") >= stat(&fixed_err, "wire:", "B up,"));
        assert!(stat(&err, "compute:", "layer-rows") >= stat(&fixed_err, "compute:", "layer-rows"));
    }
    let out = generate(&["--split-policy", "random"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--split-policy random needs --k1 and --k2 lists"),
        "{}",
        stderr(&out)
    );
    let out = generate(&["--split-policy", "random", "--k1", "1,5", "--k2", "5,28"]);
    assert!(
        stderr(&out).contains("every K1 must be below every K2, but K1 = 5 and K2 = 5"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_capture_holds_the_bytes_the_stats_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let capture = dir.path().join("capture");
    let capture = capture.to_str().expect("utf-8 path");
    for extra in [
        &["--split", "2:28"][..],
        &[
            "--split-policy",
            "random",
            "--k1",
            "1,2",
            "--k2",
            "27,28",
            "--obfuscate",
            "permute",
        ][..],
    ] {
        let mut args = extra.to_vec();
        args.extend_from_slice(&["--capture", capture, "--stats"]);
        let out = generate(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let err = stderr(&out);
        let size = |name: &str| {
            std::fs::metadata(std::path::Path::new(capture).join(name))
                .expect(name)
                .len()
        };
        assert_eq!(size("up.bin"), stat(&err, "wire:", "B up,"), "{extra:?}");
        assert_eq!(
            size("down.bin"),
            stat(&err, "wire:", "B down ("),
            "{extra:?}"
        );
    }
    let out = generate(&["--no-split", "--capture", capture]);
    assert!(!out.status.success());
}

/// The first line of `out` that starts with `label`.
fn line<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` line in {out}"))
}

#[test]
fn attack_reads_a_fixed_unpermuted_capture_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let capture = dir.path().join("capture");
    let capture = capture.to_str().expect("utf-8 path");
    let truth = dir.path().join("tokens.json");
    let truth = truth.to_str().expect("utf-8 path");
    let model = model();
    let out = lsplit(&[
        "generate",
        "List three uses of copper.",
        "--model",
        &model,
        "--max-tokens",
        "8",
        "--split",
        "2:28",
        "--capture",
        capture,
        "--save-tokens",
        truth,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The capture holds rows only: no token file, no secret.
    let mut files: Vec<String> = std::fs::read_dir(capture)
        .expect("capture dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["down.bin", "messages.jsonl", "up.bin"]);
    let attack = |extra: &[&str]| {
        let mut args = vec!["attack", "--capture", capture, "--model", &model];
        args.extend_from_slice(extra);
        lsplit(&args)
    };
    let out = attack(&["--truth", truth, "--k1", "2", "--k2", "28"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = stdout(&out);
    // 36 prompt tokens (chat template included) and 8 generated ones, the last never sent up.
    assert_eq!(line(&report, "positions:"), "positions: 43");
    assert_eq!(
        line(&report, "uplink rows matched exactly:"),
        "uplink rows matched exactly: 43 of 43"
    );
    assert!(
        line(&report, "replay:").contains(", generated 8/8 (100.0%), "),
        "{report}"
    );
    // The user's own text: "List three uses of copper." is 6 of the 36 prompt tokens, between
    // the chat template's 24 opening and 6 closing ones.
    assert_eq!(
        line(&report, "vocabulary matching: prompt"),
        "vocabulary matching: prompt 36/36 (100.0%), generated 7/8 (87.5%), user text 6/6 \
         (100.0%)"
    );
    assert!(
        line(&report, "vocabulary matching: \"").contains("List three uses of copper."),
        "{report}"
    );
    // Only what the capture holds: without the token file the attacks guess the same, and
    // only the score lines are missing.
    let out = attack(&["--k1", "2", "--k2", "28"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let is_score = |l: &&str| {
        l.split_once(": ")
            .is_some_and(|(_, rest)| rest.starts_with("prompt "))
    };
    let unscored: Vec<&str> = report.lines().filter(|l| !is_score(l)).collect();
    assert_eq!(report.lines().filter(is_score).count(), 6, "{report}");
    assert_eq!(stdout(&out).lines().collect::<Vec<_>>(), unscored);
    // A token file of another session is refused, not scored.
    let other = dir.path().join("other.json");
    std::fs::write(&other, r#"{"prompt":[1,2,3],"generated":[4]}"#).expect("write");
    let out = attack(&[
        "--truth",
        other.to_str().expect("utf-8"),
        "--k1",
        "2",
        "--k2",
        "28",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("it is not this capture's session"),
        "{}",
        stderr(&out)
    );
    let out = attack(&["--k1", "2"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--k2"), "{}", stderr(&out));
}

/// The rewrite prompt of PRIVACY.md's drafts table: its reply copies the prompt.
const REWRITE: &str = "Rewrite politely: send me the bank PIN 4921 now, and tell Aiko to send me \
                       the bank PIN 4921 now.";

#[test]
fn attack_reads_the_rows_of_rejected_drafts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let capture = dir.path().join("capture");
    let capture = capture.to_str().expect("utf-8 path");
    let truth = dir.path().join("tokens.json");
    let truth = truth.to_str().expect("utf-8 path");
    let model = model();
    let out = lsplit(&[
        "generate",
        REWRITE,
        "--model",
        &model,
        "--max-tokens",
        "12",
        "--split",
        "2:28",
        "--speculate",
        "lookahead",
        "--capture",
        capture,
        "--save-tokens",
        truth,
        "--stats",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The token file records each drafted token run and not kept: generation ended at
    // --max-tokens with every draft checked, so the drafted less the accepted.
    let tokens: serde_json::Value =
        serde_json::from_slice(&std::fs::read(truth).expect("token file")).expect("json");
    let rejected = tokens["rejected"]
        .as_array()
        .expect("rejected drafts")
        .len();
    let err = stderr(&out);
    let (drafted, accepted) = (
        stat(&err, "steps:", "accepted"),
        stat(&err, "steps:", "(drafting"),
    );
    assert_eq!(rejected as u64, drafted - accepted, "{err}");
    let out = lsplit(&[
        "attack",
        "--capture",
        capture,
        "--model",
        &model,
        "--truth",
        truth,
        "--k1",
        "2",
        "--k2",
        "28",
        "--decoder-steps",
        "0",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = stdout(&out);
    // Every rejected row was rewound by a later step, and at K1 = 2 in f32 matching reads
    // each exactly: the rows of the tokens the device guessed and threw away.
    assert_eq!(
        line(&report, "uplink rows rewound"),
        format!("uplink rows rewound (rejected drafts): {rejected}, matched exactly: {rejected}")
    );
    assert_eq!(
        line(&report, "rejected drafted rows:"),
        format!(
            "rejected drafted rows: {rejected} crossed ({rejected} rewound on the wire, 0 never rewound)"
        )
    );
    for attack in ["vocabulary matching", "known plaintext"] {
        assert_eq!(
            line(&report, &format!("{attack}: rejected")),
            format!("{attack}: rejected drafts {rejected}/{rejected} (100.0%)")
        );
    }
    // Lookahead's 12 tokens: 52 drafted, none kept (every row of them crossed up and down).
    assert_eq!(rejected, 52, "{report}");
    assert_eq!(
        line(&report, "logit lens: rejected"),
        "logit lens: rejected drafts 0/52 (0.0%)"
    );
}
