//! `--adapter DIR` as a user runs it, on the tiny Hugging Face model of `crates/model/tests`
//! with `lora-head-tail` (every module of layers 0 and 3): split output equals unsplit output
//! with the adapter, in-process and against a real `lsplit serve` over loopback TLS that never
//! sees the adapter; a split that would give the trunk an adapted layer is refused by every
//! command, naming the layers; `inspect` shows which part holds what; `serve --adapter` adapts
//! its own layers only, and its fingerprint then turns away devices with the public weights.

mod common;

use std::path::{Path, PathBuf};

use common::{TinyServer, lsplit, stderr, stdout};
use lsplit_model::{ModelSource, TrunkFingerprint};

fn data(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/data")
        .join(name)
        .display()
        .to_string()
}

/// `lsplit generate` of a fixed raw prompt on the tiny model, 12 greedy tokens, with `extra`.
fn generate(extra: &[&str]) -> std::process::Output {
    let model = data("tiny-llama-hf");
    let mut args = vec![
        "generate",
        "the sea and the sky",
        "--raw",
        "--model",
        &model,
        "--max-tokens",
        "12",
    ];
    args.extend_from_slice(extra);
    lsplit(&args)
}

fn ok_text(extra: &[&str]) -> String {
    let out = generate(extra);
    assert!(out.status.success(), "{extra:?}: {}", stderr(&out));
    stdout(&out)
}

/// The refusal's end, for an adapter on `layers` and a trunk of `trunk`.
fn refusal(layers: &str, trunk: &str) -> String {
    format!(
        "the adapter updates layers {layers}, which the trunk (layers {trunk}) runs: a device \
         adapter may only update the head's and the tail's layers"
    )
}

#[test]
fn generate_with_a_device_adapter_splits_exactly_and_refuses_trunk_layers() {
    let adapter = data("lora-head-tail");
    let unsplit = ok_text(&["--no-split", "--adapter", &adapter]);
    assert!(!unsplit.trim().is_empty(), "generated nothing");
    assert_ne!(ok_text(&["--no-split"]), unsplit, "the adapter counts");
    for split in [
        &["--split", "1:3"][..],
        &["-n", "1"],
        &[
            "--split",
            "1:3",
            "--split-policy",
            "random",
            "--k1",
            "1",
            "--k2",
            "2,3",
            "--obfuscate",
            "permute",
        ],
    ] {
        let mut extra = split.to_vec();
        extra.extend(["--adapter", &adapter]);
        assert_eq!(ok_text(&extra), unsplit, "{split:?}");
    }
    let out = generate(&["--split", "2:4", "--adapter", &adapter]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&refusal("[3]", "2..4")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bench_and_edge_take_the_adapter_and_refuse_it_on_the_trunk() {
    let (model, adapter) = (data("tiny-llama-hf"), data("lora-head-tail"));
    let bench = |split: &str| {
        lsplit(&[
            "bench",
            "--model",
            &model,
            "--adapter",
            &adapter,
            "--split",
            split,
            "--runs",
            "1",
            "--prompt-tokens",
            "4",
            "--decode-tokens",
            "4",
        ])
    };
    let out = bench("1:3");
    assert!(out.status.success(), "bench: {}", stderr(&out));
    let edge = lsplit(&[
        "edge",
        "--model",
        &model,
        "--adapter",
        &adapter,
        "--split",
        "2:4",
        "--listen",
        "127.0.0.1:0",
    ]);
    for (label, out, layers, trunk) in [
        ("bench", bench("0:3"), "[0]", "0..3"),
        ("edge", edge, "[3]", "2..4"),
    ] {
        assert!(!out.status.success(), "{label} ran");
        assert!(
            stderr(&out).contains(&refusal(layers, trunk)),
            "{label}: {}",
            stderr(&out)
        );
    }
}

/// The attack's count of uplink rows it matched exactly, and the rows, on `capture`.
fn exact_matches(capture: &Path, extra: &[&str]) -> (usize, usize) {
    let model = data("tiny-llama-hf");
    let capture = capture.display().to_string();
    let mut args = vec![
        "attack",
        "--capture",
        &capture,
        "--model",
        &model,
        "--k1",
        "1",
        "--k2",
        "3",
    ];
    args.extend_from_slice(extra);
    let out = lsplit(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("uplink rows matched exactly: "))
        .unwrap_or_else(|| panic!("no match count in {text}"));
    let (matched, total) = line.split_once(" of ").expect("N of M");
    let number = |s: &str| s.split_whitespace().next().expect("n").parse().expect("n");
    (number(matched), number(total))
}

#[test]
fn a_private_adapter_hides_the_rows_from_the_public_weights_but_not_from_its_holder() {
    let adapter = data("lora-head-tail");
    let dir = tempfile::tempdir().expect("tempdir");
    let capture = dir.path().join("capture");
    let capture_arg = capture.display().to_string();
    ok_text(&[
        "--split",
        "1:3",
        "--adapter",
        &adapter,
        "--capture",
        &capture_arg,
    ]);
    let (with_public, total) = exact_matches(&capture, &[]);
    assert!(total > 0);
    assert_eq!(
        with_public, 0,
        "the public weights match none of the adapted rows"
    );
    assert_eq!(
        exact_matches(&capture, &["--adapter", &adapter]),
        (total, total)
    );
}

#[test]
fn inspect_shows_which_part_holds_the_adapter() {
    let (model, adapter) = (data("tiny-llama-hf"), data("lora-head-tail"));
    let out = lsplit(&[
        "inspect",
        "--model",
        &model,
        "--split",
        "1:3",
        "--adapter",
        &adapter,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "adapter: {adapter} (LoRA r 4, alpha 8, q_proj, k_proj, v_proj, o_proj, gate_proj, \
             up_proj, down_proj)\n"
        )),
        "{text}"
    );
    let held: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("adapter: "))
        .skip(1)
        .collect();
    assert_eq!(
        held,
        [
            format!("{adapter} on layers [0]").as_str(),
            "none",
            &format!("{adapter} on layers [3]"),
        ],
        "{text}"
    );
    let out = lsplit(&[
        "inspect",
        "--model",
        &model,
        "--split",
        "0:4",
        "--adapter",
        &adapter,
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&refusal("[0, 3]", "0..4")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_server_never_sees_a_device_adapter_and_announces_its_own() {
    let pki = tempfile::tempdir().expect("tempdir");
    let out = lsplit(&[
        "cert",
        "--out",
        &pki.path().join("pki").display().to_string(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(pki.path().join("token"), "s3cret\n").expect("token");
    let cloud = |server: &TinyServer| -> Vec<String> {
        let file = |name: &str| -> PathBuf { pki.path().join(name) };
        vec![
            "--cloud".into(),
            server.url(),
            "--ca".into(),
            file("pki/ca.pem").display().to_string(),
            "--token-file".into(),
            file("token").display().to_string(),
        ]
    };
    let adapter = data("lora-head-tail");
    let public = ModelSource::open(Path::new(&data("tiny-llama-hf"))).expect("open");
    let base = |layers| TrunkFingerprint::compute(&public, layers).expect("fingerprint");

    // A plain server: its fingerprint is the public weights', and a device with its own
    // adapter on layers 0 and 3 generates what it does alone.
    let server = TinyServer::start(pki.path(), "1:3", &[]);
    assert!(
        server.banner.contains(&base(1..3).to_string()) && !server.banner.contains("adapter"),
        "{}",
        server.banner
    );
    let remote = cloud(&server);
    let mut args: Vec<&str> = remote.iter().map(String::as_str).collect();
    args.extend(["--adapter", &adapter]);
    assert_eq!(
        ok_text(&args),
        ok_text(&["--no-split", "--adapter", &adapter])
    );
    drop(server);

    // A server may adapt its own layers only.
    let out = lsplit(&[
        "serve",
        "--insecure",
        "--listen",
        "127.0.0.1:0",
        "--split",
        "1:3",
        "--model",
        &data("tiny-llama-hf"),
        "--adapter",
        &adapter,
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the adapter updates layers [0, 3], outside the trunk's layers 1..3"),
        "{}",
        stderr(&out)
    );

    // Adapting them, it announces a fingerprint of its own, which devices holding the public
    // weights refuse.
    let server = TinyServer::start(pki.path(), "0:4", &["--adapter", &adapter]);
    assert!(
        server.banner.contains(&format!(
            "with adapter {adapter} (LoRA r 4, alpha 8, q_proj, k_proj, v_proj, o_proj, \
             gate_proj, up_proj, down_proj) on layers [0, 3] on https://"
        )),
        "{}",
        server.banner
    );
    assert!(
        !server.banner.contains(&base(0..4).to_string()),
        "{}",
        server.banner
    );
    let remote = cloud(&server);
    let args: Vec<&str> = remote.iter().map(String::as_str).collect();
    let out = generate(&args);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the trunk server runs a different model"),
        "{}",
        stderr(&out)
    );

    // A device that names the server's public adapter checks it in the fingerprint (and never
    // applies it itself): it is served, and the text is the adapted model's.
    let mut args = args;
    args.extend(["--trunk-adapter", &adapter]);
    assert_eq!(
        ok_text(&args),
        ok_text(&["--no-split", "--adapter", &adapter])
    );
}
