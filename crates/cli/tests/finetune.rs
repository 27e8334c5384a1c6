//! `lsplit finetune` as a user runs it, on the tiny Hugging Face model of `crates/model/tests`:
//! the held-out loss falls, the adapter it writes is one that `generate --adapter` loads and
//! that changes the output, a run resumes from its checkpoint, bad options are refused saying
//! why, and over loopback TLS against `lsplit serve --training` (f32 codec) the adapter comes out
//! bit for bit the in-process run's.

mod common;

use std::path::{Path, PathBuf};

use common::{TinyServer, lsplit, stderr, stdout};

fn tiny() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/data/tiny-llama-hf")
        .display()
        .to_string()
}

/// Twenty lines of text and chat, repeated so that the held-out lines are like the others.
fn data(dir: &Path) -> PathBuf {
    let path = dir.join("data.jsonl");
    let lines: Vec<&str> = (0..10)
        .flat_map(|_| {
            [
                r#"{"text": "the quick brown fox jumps over the lazy dog and the sea"}"#,
                r#"{"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris is the capital."}]}"#,
            ]
        })
        .collect();
    std::fs::write(&path, lines.join("\n")).expect("write data");
    path
}

/// `lsplit finetune` of `data` into `out` on the tiny model, at `--split 1:3` unless `extra`
/// names a split.
fn finetune(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let (model, data, out) = (
        tiny(),
        data.display().to_string(),
        out.display().to_string(),
    );
    let mut args = vec![
        "finetune", "--data", &data, "--out", &out, "--model", &model, "--lr", "1e-2",
    ];
    if !extra.contains(&"--split") {
        args.extend(["--split", "1:3"]);
    }
    args.extend_from_slice(extra);
    lsplit(&args)
}

/// The loss of a `held-out loss WHEN: X (...)` line.
fn held_out(text: &str, when: &str) -> f64 {
    let prefix = format!("held-out loss {when}: ");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in {text}"));
    line.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a loss")
}

fn generate(extra: &[&str]) -> String {
    let model = tiny();
    let mut args = vec![
        "generate",
        "the quick brown",
        "--raw",
        "--model",
        &model,
        "--max-tokens",
        "8",
        "--split",
        "1:3",
    ];
    args.extend_from_slice(extra);
    let out = lsplit(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

#[test]
fn finetune_lowers_the_held_out_loss_and_writes_an_adapter_generate_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data(dir.path());
    let out_dir = dir.path().join("adapter");
    let out = finetune(
        &data,
        &out_dir,
        &["--steps", "30", "--checkpoint-every", "10"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("on layers [0, 3] (split 1:3) with 18 examples, 2 held out"),
        "{text}"
    );
    let (before, after) = (held_out(&text, "before"), held_out(&text, "after"));
    assert!(after < 0.5 * before, "held-out loss {before} -> {after}");
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(out_dir.join(file).is_file(), "{file}");
        assert!(
            out_dir.join("checkpoint").join(file).is_file(),
            "checkpoint {file}"
        );
    }
    let adapter = out_dir.display().to_string();
    assert_ne!(
        generate(&["--adapter", &adapter]),
        generate(&[]),
        "the adapter counts"
    );
}

/// The `FILE loss WHEN: ...` line of `--eval-data FILE`, whole.
fn eval_line<'a>(text: &'a str, file: &Path, when: &str) -> &'a str {
    let prefix = format!("{} loss {when}: ", file.display());
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in {text}"))
}

#[test]
fn eval_data_reports_each_files_loss_before_and_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data(dir.path());
    let line = r#"{"text": "the quick brown fox jumps over the lazy dog and the sea"}"#;
    let (once, twice) = (
        dir.path().join("once.jsonl"),
        dir.path().join("twice.jsonl"),
    );
    std::fs::write(&once, line).expect("once");
    std::fs::write(&twice, format!("{line}\n\n{line}\n")).expect("twice");
    let out_dir = dir.path().join("adapter");
    let (once_arg, twice_arg) = (once.display().to_string(), twice.display().to_string());
    let extra = [
        "--steps",
        "30",
        "--eval-data",
        &once_arg,
        "--eval-data",
        &twice_arg,
    ];
    let out = finetune(&data, &out_dir, &extra);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    // Every line counts: the same line twice is the same mean loss over twice the tokens.
    let (before_once, before_twice) = (
        eval_line(&text, &once, "before"),
        eval_line(&text, &twice, "before"),
    );
    let tokens = |line: &str| -> usize {
        let count = line.rsplit(", ").next().expect("tokens");
        count.trim_end_matches(" tokens)").parse().expect("a count")
    };
    assert_eq!(tokens(before_twice), 2 * tokens(before_once), "{text}");
    let loss = |line: &str| line.split(' ').next().expect("loss").to_string();
    assert_eq!(loss(before_once), loss(before_twice), "{text}");
    // Trained on that very line, the adapter lowers its loss.
    let after: f64 = loss(eval_line(&text, &once, "after"))
        .parse()
        .expect("after");
    let before: f64 = loss(before_once).parse().expect("before");
    assert!(after < 0.5 * before, "{before} -> {after}");
    // The held-out report is still there, first.
    assert!(
        text.find("held-out loss before").expect("held-out") < text.find(&once_arg).expect("eval")
    );

    let missing = dir.path().join("missing-eval.jsonl").display().to_string();
    let out = finetune(&data, &out_dir, &["--eval-data", &missing]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("missing-eval.jsonl"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_run_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data(dir.path());
    let out_dir = dir.path().join("adapter");
    let first = finetune(
        &data,
        &out_dir,
        &["--steps", "4", "--checkpoint-every", "2"],
    );
    assert!(first.status.success(), "{}", stderr(&first));
    let second = finetune(&data, &out_dir, &["--steps", "6", "--resume"]);
    assert!(second.status.success(), "{}", stderr(&second));
    let text = stdout(&second);
    assert!(text.contains("resuming at step 4"), "{text}");
    assert!(text.contains("over 2 steps"), "{text}");
    // Another rank is another run: its checkpoint is refused.
    let third = finetune(
        &data,
        &out_dir,
        &["--steps", "8", "--resume", "--rank", "2"],
    );
    assert!(!third.status.success());
    assert!(
        stderr(&third).contains("it is of another run"),
        "{}",
        stderr(&third)
    );
}

/// Each `(flags, message)` of `cases`: `finetune` with those flags fails, saying `message`.
fn assert_refused(data: &Path, out_dir: &Path, cases: &[(&[&str], &str)]) {
    for (extra, expected) in cases {
        let out = finetune(data, out_dir, extra);
        assert!(!out.status.success(), "{extra:?}");
        assert!(
            stderr(&out).contains(expected),
            "{extra:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn bad_options_are_refused_saying_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data(dir.path());
    let out_dir = dir.path().join("adapter");
    let cases: [(&[&str], &str); 4] = [
        (&["--targets", "q,bogus"], "unknown projection `bogus`"),
        (&["--split", "0:4"], "leaves the device no layers to adapt"),
        (
            &["--eval-fraction", "1.5"],
            "held-out fraction 1.5 is not within [0, 1)",
        ),
        (&["--ca", "ca.pem"], "--ca is for a trunk server"),
    ];
    assert_refused(&data, &out_dir, &cases);
    let out = finetune(&dir.path().join("missing.jsonl"), &out_dir, &[]);
    assert!(stderr(&out).contains("missing.jsonl"), "{}", stderr(&out));
}

#[test]
fn finetune_over_tls_writes_the_in_process_adapter_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = lsplit(&[
        "cert",
        "--out",
        &dir.path().join("pki").display().to_string(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(dir.path().join("token"), "s3cret\n").expect("token");
    let data = data(dir.path());
    let steps = ["--steps", "6"];
    let local = dir.path().join("local");
    let out = finetune(&data, &local, &steps);
    assert!(out.status.success(), "{}", stderr(&out));

    let server = TinyServer::start(dir.path(), "1:3", &["--training"]);
    assert!(server.banner.contains("training too"), "{}", server.banner);
    let (ca, token) = (
        dir.path().join("pki/ca.pem").display().to_string(),
        dir.path().join("token").display().to_string(),
    );
    let url = server.url();
    let cloud = |out: &Path, token: &str| {
        let (model, data, out) = (
            tiny(),
            data.display().to_string(),
            out.display().to_string(),
        );
        lsplit(&[
            "finetune",
            "--data",
            &data,
            "--out",
            &out,
            "--model",
            &model,
            "--lr",
            "1e-2",
            "--steps",
            "6",
            "--cloud",
            &url,
            "--ca",
            &ca,
            "--token-file",
            token,
        ])
    };
    let remote = dir.path().join("remote");
    let out = cloud(&remote, &token);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("(split 1:3)"), "{text}");
    // f32 rows of 64 values: 256 bytes a token for the forward rows and as much for their
    // gradient, each way, counted by the client.
    let tokens: u64 = text
        .split_once("over 6 steps (")
        .and_then(|(_, rest)| rest.split_once(" tokens)"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no token count in {text}"));
    let each_way = 512 * tokens;
    assert!(
        text.contains(&format!(
            "payload over {tokens} training tokens: {each_way} bytes sent to the trunk server \
             (512 per token), {each_way} received (512 per token)"
        )),
        "{text}"
    );
    let bytes = |dir: &Path| std::fs::read(dir.join("adapter_model.safetensors")).expect("read");
    assert_eq!(bytes(&remote), bytes(&local));

    // The server's token is required.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "guess\n").expect("token");
    let out = cloud(&dir.path().join("refused"), &wrong.display().to_string());
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the bearer token is not valid"),
        "{}",
        stderr(&out)
    );
    drop(server);

    // A server that does not serve training says so.
    let server = TinyServer::start(dir.path(), "1:3", &[]);
    let url = server.url();
    let (model, data_arg, out_arg) = (
        tiny(),
        data.display().to_string(),
        dir.path().join("none").display().to_string(),
    );
    let out = lsplit(&[
        "finetune",
        "--data",
        &data_arg,
        "--out",
        &out_arg,
        "--model",
        &model,
        "--cloud",
        &url,
        "--ca",
        &ca,
        "--token-file",
        &token,
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("TrainTrunk"), "{}", stderr(&out));
}

/// The distance correlation of a `distance correlation with the public head's rows WHEN: X
/// (...)` line.
fn distance_correlation(text: &str, when: &str) -> f64 {
    let prefix = format!("distance correlation with the public head's rows {when}: ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no `{prefix}` line in {text}"))
}

#[test]
fn privacy_weight_moves_the_uplink_rows_from_the_public_heads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data(dir.path());
    let out_dir = dir.path().join("adapter");
    let out = finetune(&data, &out_dir, &["--steps", "8", "--privacy-weight", "10"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("distance correlation with the public head's rows before: 1.0000 ("),
        "{text}"
    );
    let after = distance_correlation(&text, "after");
    assert!(after < 0.95, "distance correlation 1 -> {after}");
    // Without the flag, nothing is reported.
    let out = finetune(&data, &out_dir, &["--steps", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains("distance correlation"));

    let cases: [(&[&str], &str); 2] = [
        (
            &["--privacy-weight=-1"],
            "the privacy weight -1 is not a number of at least 0",
        ),
        (
            &["--privacy-weight", "1", "--split", "0:3"],
            "the split 0:3 leaves the device no head layer: a privacy term has no rows to change",
        ),
    ];
    assert_refused(&data, &out_dir, &cases);
}

/// The whole `FILE loss WHEN LABEL: ...` line of the held-out examples, after its prefix.
fn held_out_line<'a>(text: &'a str, when_label: &str) -> &'a str {
    let prefix = format!("held-out loss {when_label}: ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in {text}"))
}

#[test]
fn uplink_noise_trains_a_denoiser_that_repeats_from_its_seed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data(dir.path());
    let run = |name: &str, extra: &[&str]| {
        let out_dir = dir.path().join(name);
        let mut args = vec!["--steps", "20", "--uplink-noise", "2"];
        args.extend_from_slice(extra);
        let out = finetune(&data, &out_dir, &args);
        assert!(out.status.success(), "{}", stderr(&out));
        let bytes = std::fs::read(out_dir.join("adapter_model.safetensors")).expect("adapter");
        (stdout(&out), bytes)
    };
    let (text, adapter) = run("noised", &["--eval-noise", "0", "--eval-noise", "2"]);
    assert!(
        text.contains(
            "the trunk receives rows with uplink noise `--uplink-noise 2` (noise seed 0), in \
             training and in the losses below unless they name another"
        ),
        "{text}"
    );
    // --eval-noise at the run's own level draws the run's own noise: the same loss exactly.
    for when in ["before", "after"] {
        assert_eq!(
            held_out_line(&text, when),
            held_out_line(&text, &format!("{when} (uplink noise 2)")),
            "{text}"
        );
    }
    let loss = |line: &str| -> f64 {
        line.split(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("a loss")
    };
    let unnoised = loss(held_out_line(&text, "before (no uplink noise)"));
    let (before, after) = (held_out(&text, "before"), held_out(&text, "after"));
    assert!(
        (before - unnoised).abs() > 0.005 * unnoised,
        "held-out loss before: {before} with the noise, {unnoised} without"
    );
    assert!(
        after < 0.9 * before,
        "noisy held-out loss {before} -> {after}"
    );
    // The noise comes from --seed unless --noise-seed names another.
    assert_eq!(run("again", &["--noise-seed", "0"]).1, adapter);
    assert_ne!(run("other", &["--noise-seed", "1"]).1, adapter);
    // With the privacy term as well.
    let (text, _) = run("both", &["--privacy-weight", "10"]);
    assert!(
        text.contains("distance correlation with the public head's rows before: 1.0000 ("),
        "{text}"
    );
}

#[test]
fn uplink_noise_settings_are_checked_and_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data(dir.path());
    let out_dir = dir.path().join("adapter");
    let cases: [(&[&str], &str); 8] = [
        (
            &["--uplink-noise=-1"],
            "--uplink-noise must be a number in (0, 10000], not -1",
        ),
        (
            &["--uplink-noise", "NaN"],
            "--uplink-noise must be a number in (0, 10000], not NaN",
        ),
        (
            &["--uplink-noise", "2e4"],
            "--uplink-noise must be a number in (0, 10000], not 20000",
        ),
        (
            &["--uplink-noise", "0.5", "--uplink-clip", "0"],
            "--uplink-clip must be a positive finite RMS, not 0",
        ),
        (
            &["--uplink-clip", "2"],
            "the following required arguments were not provided:\n  --uplink-noise <SIGMA>",
        ),
        (
            &["--eval-noise=-0.5"],
            "--eval-noise must be 0 or a number in (0, 10000], not -0.5",
        ),
        (
            &["--noise-seed", "3"],
            "--noise-seed seeds --uplink-noise or --eval-noise; give one of them",
        ),
        (
            &["--uplink-noise", "0.5", "--split", "4:4"],
            "the split 4:4 sends no rows to a trunk: uplink noise has nothing to noise",
        ),
    ];
    assert_refused(&data, &out_dir, &cases);

    // A checkpoint records the noise: resuming with another is refused.
    let first = finetune(
        &data,
        &out_dir,
        &[
            "--steps",
            "2",
            "--uplink-noise",
            "0.5",
            "--uplink-clip",
            "3",
        ],
    );
    assert!(first.status.success(), "{}", stderr(&first));
    let cases: [(&[&str], &str); 2] = [
        (
            &["--steps", "4", "--resume", "--uplink-noise", "0.2"],
            "uplink noise 0.5 (clip 3, seed 0)); this one is split 1:3, rank 8, targets \
             q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj, seed 0, accumulate 4, \
             privacy weight 0, uplink noise 0.2 (seed 0)",
        ),
        (
            &["--steps", "4", "--resume"],
            "privacy weight 0, uplink noise none",
        ),
    ];
    assert_refused(&data, &out_dir, &cases);
    let resumed = finetune(
        &data,
        &out_dir,
        &[
            "--steps",
            "4",
            "--resume",
            "--uplink-noise",
            "0.5",
            "--uplink-clip",
            "3",
        ],
    );
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(stdout(&resumed).contains("resuming at step 2"));
}
