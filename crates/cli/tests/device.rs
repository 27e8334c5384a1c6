//! `--device` (issue 22) as a user meets it in a build without the `cuda` feature (the default,
//! and CI's): the CPU stays the default everywhere, a GPU is a clear error, and `lsplit
//! trunk-check` finds the CPU trunk identical to itself.

mod served;

use serde_json::Value;
use served::{Pki, Server, file, lsplit, model, run};

const NO_CUDA: &str = "this lsplit was built without the `cuda` feature; see scripts/build-cuda.sh";

#[test]
fn a_gpu_without_the_cuda_feature_is_a_clear_error() {
    let model = model();
    for args in [
        &[
            "serve",
            "--insecure",
            "--device",
            "cuda",
            "--listen",
            "127.0.0.1:0",
        ][..],
        &[
            "serve",
            "--insecure",
            "--device",
            "cuda:1",
            "--listen",
            "127.0.0.1:0",
        ],
        &["inspect", "--device", "cuda"],
        &["trunk-check", "--device", "cuda:0", "--prompts", "1"],
    ] {
        let out = lsplit()
            .args(args)
            .arg("--model")
            .arg(&model)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(NO_CUDA), "{args:?}: {stderr}");
    }
}

#[test]
fn a_device_name_that_is_not_one_is_refused_by_the_parser() {
    for bad in ["gpu", "cuda:x", "cuda:"] {
        let out = lsplit()
            .args(["serve", "--insecure", "--device", bad])
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "invalid value '{bad}' for '--device <DEVICE>': model configuration: unknown \
                 device \"{bad}\": expected cpu, cuda or cuda:N"
            )),
            "{stderr}"
        );
    }
}

#[test]
fn the_trunk_runs_on_the_cpu_by_default_and_says_so() {
    let model = model();
    let out = run(lsplit()
        .args(["inspect", "--split", "3:27", "--model"])
        .arg(&model));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\nwhere the trunk computes: cpu\n"), "{text}");

    // The server announces it and tells devices in the handshake.
    let pki = Pki::new();
    let server = Server::start(&pki.dir(), "3:27", 0);
    let out = run(lsplit()
        .args(["generate", "hi", "--max-tokens", "2", "--stats", "--model"])
        .arg(&model)
        .args(["--cloud", &server.url(), "--ca"])
        .arg(file(&pki.dir(), "ca.pem"))
        .arg("--token-file")
        .arg(file(&pki.dir(), "token")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "(trunk time is the round trips to {}: network plus remote trunk, computed on cpu)",
            server.url()
        )),
        "{stderr}"
    );
}

#[test]
fn trunk_check_finds_the_cpu_trunk_identical_to_itself() {
    let out = run(lsplit()
        .args([
            "trunk-check",
            "--split",
            "3:27",
            "--device",
            "cpu",
            "--prompts",
            "2",
        ])
        .args([
            "--tokens",
            "6",
            "--batch-sessions",
            "3",
            "--batch-steps",
            "2",
        ])
        .args([
            "--sessions",
            "1,2",
            "--context",
            "4",
            "--steps",
            "1",
            "--json",
            "--model",
        ])
        .arg(model()));
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["split"], "3:27");
    assert_eq!(
        (&report["device"], &report["reference"]),
        (&"cpu".into(), &"cpu".into())
    );
    let agreement = &report["agreement"];
    assert_eq!(agreement["prompts"], 2);
    assert_eq!(agreement["identical_prompts"], 2);
    assert_eq!(agreement["agreeing_tokens"], 12);
    assert_eq!(agreement["tokens"], 12);
    assert_eq!(agreement["agreement_percent"], 100.0);
    assert_eq!(agreement["max_logit_difference"], 0.0);
    let batched = &report["batched_vs_solo"];
    assert_eq!(
        (&batched["sessions"], &batched["steps"]),
        (&3.into(), &2.into())
    );
    assert_eq!(batched["max_difference"], 0.0);
    assert_eq!(batched["identical"], true);
    let timings = report["throughput"].as_array().expect("timings");
    let sessions: Vec<u64> = timings
        .iter()
        .map(|t| t["sessions"].as_u64().unwrap())
        .collect();
    assert_eq!(sessions, [1, 2]);
    assert!(
        timings
            .iter()
            .all(|t| t["steps_per_second"].as_f64().unwrap() > 0.0)
    );
}
