//! A split diffusion model across loopback TLS: the remote trunk gives the unsplit image byte
//! for byte, negotiates lossy codecs, serves concurrent images, refuses the wrong model and the
//! wrong token, and survives a server restart mid-image.

use std::time::{Duration, Instant};

use lsplit_diffusion::{UnetSplit, trunk_fingerprint};
use lsplit_remote::{RemoteDiffusionTrunk, RemoteError};
use lsplit_testkit::certificates;
use lsplit_testkit::diffusion::*;
use lsplit_wire::StepCodec;
use tonic::Code;

#[test]
fn remote_trunks_give_the_unsplit_image_for_both_modes_in_f32() {
    let certs = certificates();
    for (family, splits) in [
        (
            "sd15",
            &[
                UnetSplit::Component,
                UnetSplit::Lambda(1),
                UnetSplit::Lambda(2),
            ][..],
        ),
        ("sdxl", &[UnetSplit::Component, UnetSplit::Lambda(1)][..]),
    ] {
        let expected = unsplit(family, 42);
        for &split in splits {
            let server = serve(family, split, server_options(&certs), 0);
            let mut trunk = connect(&server, &certs, &[StepCodec::F32], family);
            assert_eq!(trunk.split(), split, "the device learns the split");
            assert_eq!(trunk.codec(), StepCodec::F32);
            assert_eq!(trunk.info().tls_version.as_deref(), Some("TLS 1.3"));
            let pipeline = pipeline(family, trunk.split(), trunk.codec());
            let generated = generate(&pipeline, &request(42), Some(&mut trunk));
            assert!(
                generated.image.data == expected,
                "{family} {split}: the remote image differs from the unsplit one"
            );
            assert_eq!(generated.bytes.steps, 2);
            assert_eq!(server.stats.steps(), 2, "{family} {split}");
            let metrics = server.stats.prometheus();
            assert!(metrics.contains("lsplit_images_total 1\n"), "{metrics}");
            assert!(
                metrics.contains(&format!(
                    "lsplit_payload_bytes_total{{direction=\"out\"}} {}\n",
                    generated.bytes.down
                )),
                "{metrics}"
            );
            assert!(
                metrics.contains(&format!(
                    "lsplit_payload_bytes_total{{direction=\"in\"}} {}\n",
                    generated.bytes.setup + generated.bytes.up
                )),
                "{metrics}"
            );
            assert!(
                metrics.contains("lsplit_step_seconds_count 2\n"),
                "{metrics}"
            );
        }
    }
}

#[test]
fn a_lossy_codec_is_negotiated_and_used_both_ways() {
    let certs = certificates();
    let int8: StepCodec = "int8".parse().unwrap();
    let server = serve("sd15", UnetSplit::Lambda(1), server_options(&certs), 0);
    let mut trunk = connect(&server, &certs, &[int8, StepCodec::F32], "sd15");
    assert_eq!(trunk.codec(), int8, "the device's first preference wins");
    let pipeline = pipeline("sd15", trunk.split(), trunk.codec());
    let remote = generate(&pipeline, &request(7), Some(&mut trunk));
    let local = in_process("sd15", UnetSplit::Lambda(1), int8, 7);
    assert!(
        remote.image.data == local.image.data,
        "the int8 image over the network differs from the int8 image in-process"
    );
    assert_eq!(remote.bytes, local.bytes);
    let f32 = in_process("sd15", UnetSplit::Lambda(1), StepCodec::F32, 7);
    assert!(
        remote.bytes.up * 3 < f32.bytes.up,
        "int8 is about 4x smaller"
    );
    assert!(remote.image.data != f32.image.data, "int8 is lossy");

    let only_f16 = {
        let mut options = server_options(&certs);
        options.codecs = vec![StepCodec::F16];
        serve("sd15", UnetSplit::Lambda(1), options, 0)
    };
    let refused = RemoteDiffusionTrunk::connect(
        client_options(&only_f16.url, &certs),
        &[int8, StepCodec::F32],
    )
    .unwrap_err();
    assert_eq!(
        refused.to_string(),
        "the trunk server refused: no step codec in common: the device offers [int8, f32], this \
         server serves [f16] (FailedPrecondition)"
    );
}

#[test]
fn concurrent_images_each_equal_their_solo_result() {
    let certs = certificates();
    let server = serve("sd15", UnetSplit::Lambda(1), server_options(&certs), 0);
    let seeds = [1u64, 2, 3, 4];
    let solo: Vec<Vec<u8>> = seeds
        .iter()
        .map(|&seed| {
            in_process("sd15", UnetSplit::Lambda(1), StepCodec::F32, seed)
                .image
                .data
        })
        .collect();
    let threads: Vec<_> = seeds
        .iter()
        .map(|&seed| {
            let mut trunk = connect(&server, &certs, &[StepCodec::F32], "sd15");
            std::thread::spawn(move || {
                let pipeline = pipeline("sd15", trunk.split(), trunk.codec());
                // Two images per device: the second setup reuses the connection.
                let first = generate(&pipeline, &request(seed), Some(&mut trunk));
                let again = generate(&pipeline, &request(seed), Some(&mut trunk));
                assert!(first.image.data == again.image.data);
                first.image.data
            })
        })
        .collect();
    for ((thread, expected), seed) in threads.into_iter().zip(&solo).zip(seeds) {
        let image = thread.join().expect("device thread");
        assert!(
            &image == expected,
            "seed {seed}: differs from its solo image"
        );
    }
    assert_eq!(server.stats.steps(), 16);
    assert_eq!(server.stats.sessions(), 0, "every image session is closed");
    let metrics = server.stats.prometheus();
    assert!(metrics.contains("lsplit_sessions_total 8\n"), "{metrics}");
    assert!(
        metrics.contains("lsplit_session_errors_total 0\n"),
        "devices close their images cleanly: {metrics}"
    );
}

#[test]
fn a_different_model_is_refused_naming_both_fingerprints() {
    let certs = certificates();
    let server = serve("sd15", UnetSplit::Lambda(1), server_options(&certs), 0);
    let trunk =
        RemoteDiffusionTrunk::connect(client_options(&server.url, &certs), &[StepCodec::F32])
            .expect("connect");
    let served = trunk_fingerprint(&model_dir("sd15"), UnetSplit::Lambda(1)).unwrap();
    assert_eq!(trunk.info().fingerprint, served);

    let other = trunk_fingerprint(&model_dir("sd21"), UnetSplit::Lambda(1)).unwrap();
    let error = trunk.verify_model(&model_dir("sd21")).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "the diffusion trunk server runs a different model: server UNet lambda:1 trunk \
             sha256 {}, this device's model UNet lambda:1 trunk sha256 {}",
            served.hex(),
            other.hex()
        )
    );

    // A copy of the served model with one weight changed: one the device keeps (the same
    // trunk, accepted), then one the trunk runs (refused).
    let copy = tempfile::tempdir().expect("temp dir");
    copy_dir(&model_dir("sd15"), copy.path());
    nudge(copy.path(), "conv_in.bias");
    trunk
        .verify_model(copy.path())
        .expect("the head's weights are not the trunk's");
    nudge(copy.path(), "mid_block.resnets.0.conv1.bias");
    let changed = trunk_fingerprint(copy.path(), UnetSplit::Lambda(1)).unwrap();
    let error = trunk.verify_model(copy.path()).unwrap_err();
    assert!(
        matches!(error, RemoteError::DiffusionFingerprintMismatch { server, local }
            if server == served && local == changed && changed != other),
        "{error}"
    );
}

/// Adds a little to the UNet weight `name` of the model at `root`.
fn nudge(root: &std::path::Path, name: &str) {
    let file = root.join("unet/diffusion_pytorch_model.safetensors");
    let mut tensors =
        candle_core::safetensors::load(&file, &candle_core::Device::Cpu).expect("weights");
    let tensor = tensors.get_mut(name).expect("the weight exists");
    *tensor = (&*tensor + 1e-3).expect("nudge");
    candle_core::safetensors::save(&tensors, &file).expect("save");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn a_wrong_token_is_refused() {
    let certs = certificates();
    let server = serve("sd15", UnetSplit::Component, server_options(&certs), 0);
    let mut options = client_options(&server.url, &certs);
    options.token = Some("guess".into());
    match RemoteDiffusionTrunk::connect(options.clone(), &[StepCodec::F32]).unwrap_err() {
        RemoteError::Refused { code, message } => {
            assert_eq!(code, Code::Unauthenticated);
            assert_eq!(message, "the bearer token is not valid");
        }
        other => panic!("expected a refusal, got {other}"),
    }
    options.token = None;
    let error = RemoteDiffusionTrunk::connect(options, &[StepCodec::F32]).unwrap_err();
    assert_eq!(
        error.to_string(),
        "the trunk server refused: this server requires a bearer token (Unauthenticated)"
    );
}

#[test]
fn a_server_restarted_mid_image_is_rejoined_and_the_image_is_unchanged() {
    let certs = certificates();
    let split = UnetSplit::Component;
    let expected = unsplit("sdxl", 5);
    let server = serve("sdxl", split, server_options(&certs), 0);
    let port = server.addr.port();
    let mut trunk = connect(&server, &certs, &[StepCodec::F32], "sdxl");
    let pipeline = pipeline("sdxl", split, StepCodec::F32);
    let mut server = Some(server);
    let mut restarted = None;
    let options = server_options(&certs);
    let generated = pipeline
        .generate(&request(5), Some(&mut trunk), &mut |p| {
            if p.step == 1 {
                server.take().expect("running").kill();
                let options = options.clone();
                restarted = Some(std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(300));
                    serve("sdxl", split, options, port)
                }));
            }
            Ok(())
        })
        .expect("the image survives the restart");
    assert!(generated.image.data == expected, "the image changed");
    let restarted = restarted.expect("restarted").join().expect("server");
    assert_eq!(
        restarted.stats.steps(),
        1,
        "the new server ran the last step"
    );
    let metrics = restarted.stats.prometheus();
    assert!(
        metrics.contains("lsplit_images_total 1\n"),
        "the setup was sent again"
    );
}

#[test]
fn a_server_that_stays_down_gives_a_clear_error_in_bounded_time() {
    let certs = certificates();
    let server = serve("sd15", UnetSplit::Lambda(1), server_options(&certs), 0);
    let url = server.url.clone();
    let mut trunk = connect(&server, &certs, &[StepCodec::F32], "sd15");
    let pipeline = pipeline("sd15", trunk.split(), trunk.codec());
    let mut server = Some(server);
    let started = Instant::now();
    let error = pipeline
        .generate(&request(5), Some(&mut trunk), &mut |_| {
            if let Some(server) = server.take() {
                server.kill();
            }
            Ok(())
        })
        .unwrap_err()
        .to_string();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "gave up after {:?}",
        started.elapsed()
    );
    assert!(
        error.starts_with(&format!(
            "trunk: the trunk server at {url} stayed unreachable for "
        )),
        "{error}"
    );
}
