//! `lsplit serve --model DIR` with a diffusers directory: the trunk of its UNet served over
//! loopback TLS to a device in this process, and the flags that do not apply refused clearly.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use candle_core::Device;
use lsplit_diffusion::{DevicePipeline, ImageRequest, UnetSplit, trunk_fingerprint};
use lsplit_remote::{CloudFiles, RemoteDiffusionTrunk};
use lsplit_wire::StepCodec;

/// Runs `lsplit` with `args`, logging only warnings and printing errors without backtraces.
fn lsplit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lsplit"))
        .args(args)
        .env("LSPLIT_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .expect("run lsplit")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn tiny(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../diffusion/tests/fixtures")
        .join(format!("tiny-{family}"))
}

fn request() -> ImageRequest {
    ImageRequest {
        prompt: "a lighthouse at dawn".into(),
        negative: None,
        steps: 2,
        guidance: 7.0,
        seed: 42,
        width: 64,
        height: 64,
        scheduler: None,
    }
}

fn image(split: UnetSplit, codec: StepCodec, trunk: Option<&mut RemoteDiffusionTrunk>) -> Vec<u8> {
    let pipeline = DevicePipeline::load(&tiny("sd15"), split, codec, &Device::Cpu).unwrap();
    let trunk = trunk.map(|t| t as &mut dyn lsplit_diffusion::DiffusionTrunk);
    pipeline
        .generate(&request(), trunk, &mut |_| Ok(()))
        .unwrap()
        .image
        .data
}

#[test]
fn serve_holds_a_diffusion_trunk_that_gives_the_unsplit_image_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let out = lsplit(&["cert", "--out", pki.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = dir.path().join("token");
    std::fs::write(&token, "pelican\n").unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_lsplit"))
        .env("LSPLIT_LOG", "warn")
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--unet-split",
            "component",
        ])
        .args(["--codecs", "f32,int4"])
        .arg("--model")
        .arg(tiny("sd15"))
        .arg("--cert")
        .arg(pki.join("server.pem"))
        .arg("--key")
        .arg(pki.join("server.key"))
        .arg("--token-file")
        .arg(&token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn lsplit serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let fingerprint = trunk_fingerprint(&tiny("sd15"), UnetSplit::Component).unwrap();
    assert!(
        line.starts_with(&format!(
            "lsplit serve: UNet component trunk sha256 {} on https://127.0.0.1:",
            fingerprint.hex()
        )),
        "{line}"
    );
    let port = line.trim().rsplit(':').next().unwrap();

    let files = CloudFiles {
        url: format!("https://localhost:{port}"),
        ca: Some(pki.join("ca.pem")),
        token_file: Some(token.clone()),
        ..CloudFiles::default()
    };
    let mut trunk =
        RemoteDiffusionTrunk::connect_checked(&files, &[StepCodec::F32], &tiny("sd15")).unwrap();
    assert_eq!(trunk.split(), UnetSplit::Component);
    assert_eq!(
        image(UnetSplit::Component, StepCodec::F32, Some(&mut trunk)),
        image(UnetSplit::None, StepCodec::F32, None)
    );

    let int4: StepCodec = "int4".parse().unwrap();
    let trunk =
        RemoteDiffusionTrunk::connect_checked(&files, &[int4, StepCodec::F32], &tiny("sd15"))
            .unwrap();
    assert_eq!(trunk.codec(), int4);
    let refused = RemoteDiffusionTrunk::connect_checked(&files, &[StepCodec::F16], &tiny("sd15"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        refused,
        "the trunk server refused: no step codec in common: the device offers [f16], this \
         server serves [f32, int4] (FailedPrecondition)"
    );
    let mismatch = RemoteDiffusionTrunk::connect_checked(&files, &[StepCodec::F32], &tiny("sdxl"))
        .unwrap_err()
        .to_string();
    assert!(
        mismatch.starts_with(&format!(
            "the diffusion trunk server runs a different model: server UNet component trunk \
             sha256 {}, this device's model UNet component trunk sha256 ",
            fingerprint.hex()
        )),
        "{mismatch}"
    );

    // The command line: `lsplit image --cloud` learns the split from the server and writes the
    // same PNG as the unsplit pipeline on the device.
    let png = |name: &str, extra: &[&str]| -> Vec<u8> {
        let path = dir.path().join(name);
        let model = tiny("sd15");
        let mut args = vec![
            "image",
            "a lighthouse at dawn",
            "-m",
            model.to_str().unwrap(),
            "-o",
            path.to_str().unwrap(),
            "--steps",
            "2",
            "--seed",
            "42",
            "--stats",
        ];
        args.extend_from_slice(extra);
        let out = lsplit(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        if extra.contains(&"--cloud") {
            assert!(
                stderr(&out).contains("split: component, codec: f32"),
                "{}",
                stderr(&out)
            );
        }
        std::fs::read(path).unwrap()
    };
    let url = format!("https://localhost:{port}");
    let ca = pki.join("ca.pem");
    let remote = png(
        "remote.png",
        &[
            "--cloud",
            &url,
            "--ca",
            ca.to_str().unwrap(),
            "--token-file",
            token.to_str().unwrap(),
        ],
    );
    assert_eq!(remote, png("local.png", &["--unet-split", "none"]));

    // `lsplit edge --image-cloud`: the OpenAI images API on the device, the UNet's trunk on the
    // server; the PNG equals the unsplit one (guidance 7 as above via the API's extension field).
    let gguf = lsplit_fetch::ensure_default_model().expect("default model");
    let mut edge = Command::new(env!("CARGO_BIN_EXE_lsplit"))
        .env("LSPLIT_LOG", "warn")
        .args(["edge", "--listen", "127.0.0.1:0", "--no-split", "--model"])
        .arg(&gguf)
        .arg("--image-model")
        .arg(tiny("sd15"))
        .args(["--image-cloud", &url, "--ca", ca.to_str().unwrap()])
        .arg("--token-file")
        .arg(&token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn lsplit edge");
    let mut line = String::new();
    BufReader::new(edge.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.contains(&format!("trunk {url}")) || line.contains(&url),
        "{line}"
    );
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line}"))
        .to_string();
    let body = r#"{"prompt": "a lighthouse at dawn", "size": "64x64", "steps": 2, "seed": 42, "guidance": 7.5}"#;
    let response = {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            stream,
            "POST /v1/images/generations HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    };
    let _ = edge.kill();
    let _ = edge.wait();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let json: serde_json::Value =
        serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    use base64::Engine;
    let png_bytes = base64::engine::general_purpose::STANDARD
        .decode(json["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        png_bytes,
        png(
            "local-7.5.png",
            &["--unet-split", "none", "--guidance", "7.5"]
        )
    );
    assert_eq!(json["lsplit"]["unet_split"], "component");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "serve did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn serve_refuses_flags_that_do_not_fit_the_model() {
    let sd15 = tiny("sd15");
    let sd15 = sd15.to_str().unwrap();
    for (args, message) in [
        (
            vec!["--codecs", "int9"],
            "Error: --codecs: unknown step codec `int9`: expected one of f32, f16, bf16, \
             fp8-e4m3, fp8-e5m2, int8, int7, int6, int5, int4, int3, int2, int8-ch, int7-ch, \
             int6-ch, int5-ch, int4-ch, int3-ch, int2-ch",
        ),
        (
            vec!["--split", "1:2"],
            &*format!(
                "Error: --split is for language models; {sd15} is a diffusion model (use \
                 --unet-split)"
            ),
        ),
        (
            vec!["--kv-cache", "f16"],
            &*format!(
                "Error: --kv-cache is for language models; {sd15} is a diffusion model (use \
                 --unet-split)"
            ),
        ),
        (
            vec!["--unet-split", "none"],
            "Error: --unet-split none runs everything on the device: there is no trunk to serve",
        ),
        (
            vec!["--unet-split", "lambda:5"],
            &*format!(
                "Error: loading the lambda:5 trunk of {sd15}\n\nCaused by:\n    lambda:5: this \
                 UNet has 2 levels; N must be between 1 and 2"
            ),
        ),
    ] {
        let mut all = vec![
            "serve",
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            "--model",
            sd15,
        ];
        all.extend(args);
        let out = lsplit(&all);
        assert!(!out.status.success());
        assert_eq!(stderr(&out).trim(), message, "{all:?}");
    }
}
