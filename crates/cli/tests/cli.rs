//! The `lsplit` binary as a user runs it, on the real default model.

mod common;

use std::process::Output;

use common::{lsplit, model, stderr, stdout};

fn generate(extra: &[&str]) -> Output {
    let model = model();
    let mut args = vec![
        "generate",
        "Write one sentence about the sea.",
        "--model",
        &model,
        "--max-tokens",
        "24",
    ];
    args.extend_from_slice(extra);
    lsplit(&args)
}

#[test]
fn split_output_equals_unsplit_output() {
    let baseline = generate(&["--no-split"]);
    assert!(baseline.status.success(), "{}", stderr(&baseline));
    let text = stdout(&baseline);
    assert!(text.trim().len() > 20, "generated too little: {text:?}");
    for split in [["--split", "3:27"], ["--split", "0:30"], ["-n", "1"]] {
        let out = generate(&split);
        assert!(out.status.success(), "{split:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), text, "{split:?}");
    }
}

#[test]
fn reduced_precision_kv_caches_keep_split_output_equal_to_unsplit() {
    for kv in ["f16", "q8"] {
        let baseline = generate(&["--no-split", "--kv-cache", kv]);
        assert!(baseline.status.success(), "{kv}: {}", stderr(&baseline));
        let text = stdout(&baseline);
        assert!(
            text.trim().len() > 20,
            "{kv}: generated too little: {text:?}"
        );
        let split = generate(&["--split", "3:27", "--kv-cache", kv]);
        assert!(split.status.success(), "{kv}: {}", stderr(&split));
        assert_eq!(stdout(&split), text, "{kv}");
    }
    let out = generate(&["--kv-cache", "q4"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown KV cache precision \"q4\": expected f32, f16 or q8"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn stats_report_bytes_per_token_on_stderr() {
    let out = generate(&["--split", "2:28", "--stats", "--codec", "f16"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("split: 2:28, codec: f16"), "{err}");
    // f16 rows of SmolLM2's 576-wide hidden state: 1152 bytes per token each way.
    assert!(err.contains("(1152 B up, 1152 B down per token)"), "{err}");
    assert!(err.contains("decode") && err.contains("tokens/s"), "{err}");
    assert!(
        !stdout(&out).contains("tokens/s"),
        "stats must not go to stdout"
    );
}

#[test]
fn drafted_tokens_leave_the_text_unchanged_in_fewer_steps() {
    let rewrite = [
        "--raw",
        "--split",
        "2:28",
        "--stats",
        "<|im_start|>user\nRepeat exactly: the quick brown fox jumps over the lazy dog.<|im_end|>\n<|im_start|>assistant\n",
    ];
    let steps = |out: &Output| -> (usize, String) {
        let err = stderr(out);
        let line = err
            .lines()
            .find(|l| l.starts_with("steps: "))
            .unwrap_or_else(|| panic!("no steps line in {err}"));
        let count = line["steps: ".len()..]
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no step count in {line}"));
        (count, line.to_owned())
    };
    let off = lsplit(
        &[
            &["generate", "--model", &model(), "--max-tokens", "24"],
            &rewrite[..],
        ]
        .concat(),
    );
    assert!(off.status.success(), "{}", stderr(&off));
    let (off_steps, line) = steps(&off);
    assert_eq!(off_steps, 23, "{line}");
    for source in ["lookup", "auto"] {
        let out = lsplit(
            &[
                &[
                    "generate",
                    "--model",
                    &model(),
                    "--max-tokens",
                    "24",
                    "--speculate",
                    source,
                ],
                &rewrite[..],
            ]
            .concat(),
        );
        assert!(out.status.success(), "{source}: {}", stderr(&out));
        assert_eq!(stdout(&out), stdout(&off), "{source}");
        let (count, line) = steps(&out);
        if source == "lookup" {
            assert!(count < off_steps, "{line}");
        } else {
            // In-process, a step has no round trip to save: auto drafts nothing.
            assert_eq!(count, off_steps, "{line}");
        }
    }
    let out = generate(&["--speculate", "fast"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown speculation \"fast\": expected off, auto or lookup"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_draft_model_leaves_the_text_unchanged_in_fewer_steps_and_a_wrong_one_is_refused() {
    let model = model();
    let off = generate(&["--split", "2:28", "--stats"]);
    assert!(off.status.success(), "{}", stderr(&off));
    let out = generate(&[
        "--split",
        "2:28",
        "--stats",
        "--speculate",
        "draft",
        "--draft-model",
        &model,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), stdout(&off));
    let err = stderr(&out);
    let line = err
        .lines()
        .find(|l| l.starts_with("steps: "))
        .expect("steps line");
    assert!(!line.starts_with("steps: 23 "), "{line}");

    let out = generate(&["--speculate", "draft"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--speculate draft needs a draft model (--draft-model PATH)"),
        "{}",
        stderr(&out)
    );
    let tiny = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../model/tests/data/tiny-llama-hf"
    );
    let out = generate(&["--speculate", "draft", "--draft-model", tiny]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("a draft model needs the model's tokenizer"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn invalid_split_names_the_model_layer_count() {
    let out = generate(&["--split", "12:31"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(
            "invalid split 12:31: need 0 <= K1 <= K2 <= L, and this model has L = 30 layers"
        ),
        "{}",
        stderr(&out)
    );
    let out = generate(&["-n", "16"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("this model has L = 30 layers"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn conflicting_split_flags_are_rejected() {
    let out = generate(&["--split", "3:27", "--no-split"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn prompt_longer_than_the_context_is_a_clear_error() {
    let model = model();
    let prompt = "7 ".repeat(5000);
    let out = lsplit(&[
        "generate",
        &prompt,
        "--model",
        &model,
        "--raw",
        "--max-tokens",
        "1",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("tokens long but the model's context length is 8192"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn missing_model_file_is_named() {
    let out = lsplit(&["generate", "hi", "--model", "/nonexistent/model.gguf"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/model.gguf"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn inspect_prints_what_each_part_holds() {
    let model = model();
    let out = lsplit(&["inspect", "--model", &model, "--split", "3:27"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| {
            ["head ", "trunk ", "tail "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{text}");
    assert_eq!(rows[0][..3], ["head", "0..3", "28"]);
    assert_eq!(rows[1][..3], ["trunk", "3..27", "216"]);
    assert_eq!(rows[2][..3], ["tail", "27..30", "29"]);
    assert_eq!(rows[1][5], "cloud");
    let params: Vec<u64> = rows.iter().map(|r| r[3].parse().expect("params")).collect();
    // Head and tail both hold the tied 49152 x 576 embedding matrix.
    // SmolLM2: embeddings 49152 x 576; a layer holds q, o (576 x 576), k, v (192 x 576),
    // gate, up, down (1536 x 576) and two norms (576). Head and tail both hold the tied
    // embedding matrix; the trunk holds layers only.
    let embeddings = 49152 * 576;
    let layer = 2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576 + 2 * 576;
    assert_eq!(
        params,
        [
            embeddings + 3 * layer,
            24 * layer,
            embeddings + 3 * layer + 576
        ]
    );
    let whole = lsplit(&["inspect", "--model", &model, "--no-split"]);
    let whole_text = stdout(&whole);
    let whole_row: Vec<&str> = whole_text
        .lines()
        .find(|l| l.starts_with("whole "))
        .expect("whole row")
        .split_whitespace()
        .collect();
    assert_eq!(whole_row[..3], ["whole", "0..30", "272"]);
}

#[test]
fn bench_reports_both_configurations_and_can_measure_one() {
    let model = model();
    let common = [
        "bench",
        "--model",
        &model,
        "--runs",
        "2",
        "--prompt-tokens",
        "8",
        "--decode-tokens",
        "3",
        "--split",
        "4:26",
    ];
    let out = lsplit(&common);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("split 4:26, codec f32, speculate off, 2 runs (median)"),
        "{text}"
    );
    for row in ["prefill 8 tokens (tok/s)", "decode 3 tokens (tok/s)"] {
        let line = text.lines().find(|l| l.starts_with(row)).expect(row);
        let numbers: Vec<f64> = line[row.len()..]
            .split_whitespace()
            .map(|n| n.parse().expect("number"))
            .collect();
        assert_eq!(numbers.len(), 3, "{line}");
        assert!(numbers.iter().all(|n| *n > 0.0), "{line}");
    }

    let mut json_args = common.to_vec();
    json_args.extend(["--only", "split", "--json"]);
    let out = lsplit(&json_args);
    assert!(out.status.success(), "{}", stderr(&out));
    let json = stdout(&out);
    assert!(
        json.starts_with("{\"layers\":30,\"split\":\"4:26\""),
        "{json}"
    );
    assert!(json.contains("\"split\":{\"prefill\":["), "{json}");
    assert!(
        !json.contains("\"unsplit\""),
        "--only split measures the split alone: {json}"
    );

    let out = lsplit(&["bench", "--model", &model, "--no-split"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("give --split or -n, not --no-split"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn help_shows_the_long_description() {
    let out = lsplit(&["--help"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with(
            "Split computing for generative AI; the split does not hide the text from the \
             trunk's operator.\n\nThe model is cut into a head and a tail that run on this \
             device and a trunk (the heavy middle) that runs in the cloud; only hidden states \
             cross between them, and with the public weights they give the prompt and the reply \
             back, under every defence measured that leaves the model usable (PRIVACY.md: \
             `lsplit attack --table`).\n"
        ),
        "{}",
        stdout(&out)
    );
}

#[test]
fn completions_are_printed_for_bash_zsh_and_fish() {
    for (shell, start) in [
        ("bash", "_lsplit() {"),
        ("zsh", "#compdef lsplit"),
        ("fish", "# Print an optspec for argparse"),
    ] {
        let out = lsplit(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        assert!(script.starts_with(start), "{shell}: {script}");
        assert!(script.contains("served-model-name"), "{shell}: {script}");
    }
    let out = lsplit(&["completions", "tcsh"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid value 'tcsh' for '<SHELL>'"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn version_names_the_kernels_chosen_at_run_time() {
    let out = lsplit(&["--version"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let version = stdout(&out);
    assert!(
        ["amx", "avx512-vnni", "avx2", "portable"]
            .iter()
            .any(|path| version == format!("lsplit 0.1.0 (kernels: {path})\n")),
        "{version}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lsplit"))
        .arg("--version")
        .env("LSPLIT_KERNELS", "portable")
        .output()
        .expect("run lsplit");
    assert_eq!(stdout(&out), "lsplit 0.1.0 (kernels: portable)\n");
}
