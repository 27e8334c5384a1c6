//! `lsplit image` end to end on the tiny random-weight SD 1.5-like model of the diffusion crate's
//! fixtures (not a real model: its images are noise-like, but every weight is used).

mod common;

use std::path::PathBuf;

use common::{lsplit, stderr, stdout};

fn tiny(family: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../diffusion/tests/fixtures")
        .join(format!("tiny-{family}"))
        .display()
        .to_string()
}

fn image(args: &[&str], out: &std::path::Path) -> Vec<u8> {
    let model = tiny("sd15");
    let out_s = out.display().to_string();
    let mut all = vec![
        "image",
        "a lighthouse at dawn",
        "-m",
        &model,
        "-o",
        &out_s,
        "--steps",
        "3",
        "--seed",
        "42",
    ];
    all.extend_from_slice(args);
    let run = lsplit(&all);
    assert!(
        run.status.success(),
        "lsplit image failed: {}",
        stderr(&run)
    );
    std::fs::read(out).unwrap()
}

#[test]
fn split_modes_write_the_same_png_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let none = image(&["--unet-split", "none"], &dir.path().join("none.png"));
    assert_eq!(&none[..8], b"\x89PNG\r\n\x1a\n");
    for split in ["component", "lambda:1", "lambda:2"] {
        let out = image(
            &["--unet-split", split],
            &dir.path().join(format!("{split}.png")),
        );
        assert_eq!(out, none, "{split}");
    }
    let other_seed = {
        let model = tiny("sd15");
        let path = dir.path().join("seed7.png").display().to_string();
        let run = lsplit(&[
            "image",
            "a lighthouse at dawn",
            "-m",
            &model,
            "-o",
            &path,
            "--steps",
            "3",
            "--seed",
            "7",
        ]);
        assert!(run.status.success());
        std::fs::read(&path).unwrap()
    };
    assert_ne!(other_seed, none);
}

#[test]
fn compare_stats_and_previews() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lh.png");
    let model = tiny("sd15");
    let out_s = out.display().to_string();
    let run = lsplit(&[
        "image",
        "a lighthouse at dawn",
        "-m",
        &model,
        "-o",
        &out_s,
        "--steps",
        "4",
        "--seed",
        "1",
        "--codec",
        "int4",
        "--compare",
        "--stats",
        "--preview-every",
        "2",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let printed = stdout(&run);
    let line = printed.lines().next().unwrap();
    let psnr: f64 = line
        .strip_prefix("against f32: PSNR ")
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unexpected --compare output: {line}"));
    assert!(psnr > 15.0 && psnr < 60.0, "int4 PSNR {psnr}");
    let err = stderr(&run);
    // lambda:1 on sd15 with int4 per tensor: setup [2,77,32] = 8 + 4928/2 bytes; up per step
    // [2,32,4,4] and [2,128], down [2,64,8,8].
    assert!(
        err.contains("split: lambda:1, codec: int4, 4 steps"),
        "{err}"
    );
    assert!(
        err.contains("bytes: setup 2472 once, up 2624 (656 per step), down 16416 (4104 per step)"),
        "{err}"
    );
    assert!(dir.path().join("lh.step-002.png").is_file());
    assert!(
        !dir.path().join("lh.step-004.png").exists(),
        "the last step is the image itself"
    );
}

#[test]
fn bad_options_are_explained() {
    let model = tiny("sd15");
    let run = lsplit(&["image", "x", "-m", &model, "--unet-split", "lambda:0"]);
    assert!(!run.status.success());
    assert!(
        stderr(&run).contains(
            "unknown UNet split \"lambda:0\": expected none, component or lambda:N (N >= 1)"
        ),
        "{}",
        stderr(&run)
    );
    let run = lsplit(&["image", "x", "-m", &model, "--codec", "int9"]);
    assert!(!run.status.success());
    assert!(
        stderr(&run).contains("unknown step codec `int9`"),
        "{}",
        stderr(&run)
    );
    let run = lsplit(&[
        "image",
        "x",
        "-m",
        &model,
        "--unet-split",
        "lambda:3",
        "--steps",
        "1",
    ]);
    assert!(!run.status.success());
    assert!(
        stderr(&run).contains("lambda:3: this UNet has 2 levels; N must be between 1 and 2"),
        "{}",
        stderr(&run)
    );
    let run = lsplit(&["image", "x", "-m", "/nonexistent", "--steps", "1"]);
    assert!(!run.status.success());
    assert!(
        stderr(&run).contains("/nonexistent is not a directory"),
        "{}",
        stderr(&run)
    );
}

#[test]
fn codec_table_lists_every_split_and_codec() {
    let model = tiny("sd15");
    let run = lsplit(&[
        "image",
        "a cat",
        "-m",
        &model,
        "--steps",
        "2",
        "--seed",
        "3",
        "--codec-table",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let table = stdout(&run);
    let rows: Vec<&str> = table.lines().skip(2).collect();
    // component, lambda:1 and lambda:2, each with all 19 codecs.
    assert_eq!(rows.len(), 3 * 19, "{table}");
    assert!(rows[0].starts_with("| component | f32 | 19712 | 1024 | 1024 | inf | 1.0000 |"));
    assert!(rows.iter().any(|r| r.starts_with("| lambda:2 | int2-ch |")));
}
