//! The remote trunk over real TLS on loopback: same output as in-process, and refusals.

use lsplit_server::DevCertificates;
use lsplit_testkit::certificates;
use lsplit_testkit::llm::*;
use lsplit_wire::Codec;

#[test]
fn remote_output_equals_in_process_output_for_several_splits() {
    let path = model_path();
    let certs = certificates();
    for (k1, k2, codec) in [
        (2, 28, Codec::F32),
        (7, 19, Codec::F16),
        (0, 30, Codec::Int8),
    ] {
        let expected = in_process(&path, k1, k2, codec);
        assert_eq!(
            expected.len(),
            MAX_TOKENS,
            "{k1}:{k2} generated too few tokens"
        );
        let server = serve(&path, k1, k2, tls_options(&certs));
        let trunk = remote(&path, client_options(&server, &certs, codec)).expect("connect");
        assert_eq!(trunk.info().codec, codec);
        assert_eq!(trunk.info().fingerprint.layers, k1..k2);
        let model = device_model(&path, k1, k2, codec);
        let got = generate(&model, Box::new(trunk));
        assert_eq!(got, expected, "split {k1}:{k2} with {codec}");
    }
}

fn connect_error(options: lsplit_remote::RemoteOptions) -> String {
    lsplit_remote::RemoteTrunk::connect(options)
        .expect_err("the connection must be refused")
        .to_string()
}

#[test]
fn bearer_tokens_are_checked() {
    let path = model_path();
    let certs = certificates();
    let mut options = tls_options(&certs);
    options.access.token = Some("correct horse".into());
    let server = serve(&path, 2, 28, options);

    let mut client = client_options(&server, &certs, Codec::F32);
    assert_eq!(
        connect_error(client.clone()),
        "the trunk server refused: this server requires a bearer token (Unauthenticated)"
    );
    client.token = Some("battery staple".into());
    assert_eq!(
        connect_error(client.clone()),
        "the trunk server refused: the bearer token is not valid (Unauthenticated)"
    );
    client.token = Some("correct horse\n".into());
    let trunk = remote(&path, client).expect("the right token is accepted");
    let model = device_model(&path, 2, 28, Codec::F32);
    assert_eq!(generate(&model, Box::new(trunk)).len(), MAX_TOKENS);
}

#[test]
fn a_server_signed_by_another_ca_is_refused() {
    let path = model_path();
    let certs = certificates();
    let other = DevCertificates::generate(&[]).expect("other certificates");
    let server = serve(&path, 2, 28, tls_options(&certs));
    let message = connect_error(client_options(&server, &other, Codec::F32));
    assert!(
        message.starts_with(&format!(
            "could not connect to the trunk server at {}",
            server.url
        )),
        "{message}"
    );
    assert!(message.contains("invalid peer certificate"), "{message}");
}

#[test]
fn plaintext_and_tls_do_not_mix() {
    let path = model_path();
    let certs = certificates();
    let tls_server = serve(&path, 2, 28, tls_options(&certs));
    let mut plain_options = tls_options(&certs);
    plain_options.access.tls = None;
    let plain_server = serve(&path, 2, 28, plain_options);

    let mut client = client_options(&tls_server, &certs, Codec::F32);
    client.url = tls_server.url.replace("https://", "http://");
    assert_eq!(
        connect_error(client.clone()),
        format!(
            "`{}` is plaintext; use https:// or pass --insecure to send hidden states unencrypted",
            client.url
        )
    );
    client.insecure = true;
    let message = connect_error(client);
    assert!(
        message.starts_with("could not connect to the trunk server at http://"),
        "{message}"
    );
    assert!(
        message.ends_with("(if the server uses TLS, connect with https://)"),
        "{message}"
    );

    let mut client = client_options(&plain_server, &certs, Codec::F32);
    client.url = plain_server.url.replace("http://", "https://");
    let message = connect_error(client);
    assert!(
        message.starts_with("could not connect to the trunk server at https://"),
        "{message}"
    );
    assert!(
        message.ends_with("(the server does not speak TLS: was it started with --insecure?)"),
        "{message}"
    );
}

#[test]
fn a_server_with_different_weights_is_refused_naming_both() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let path = model_path();
    let dir = tempfile::tempdir().expect("temp dir");
    let altered = dir.path().join("altered.gguf");
    std::fs::copy(&path, &altered).expect("copy the model");
    let offset = {
        let mut file = std::fs::File::open(&altered).expect("open copy");
        let content =
            candle_core::quantized::gguf_file::Content::read(&mut file).expect("gguf header");
        content.tensor_data_offset + content.tensor_infos["blk.10.attn_q.weight"].offset + 100
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&altered)
        .expect("open copy for writing");
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(offset)).expect("seek");
    file.read_exact(&mut byte).expect("read");
    byte[0] ^= 0x40;
    file.seek(SeekFrom::Start(offset)).expect("seek");
    file.write_all(&byte).expect("write");
    drop(file);

    let certs = certificates();
    let server = serve(&altered, 2, 28, tls_options(&certs));
    let ours = lsplit_model::TrunkFingerprint::compute(&source(&path), 2..28).expect("fingerprint");
    let theirs =
        lsplit_model::TrunkFingerprint::compute(&source(&altered), 2..28).expect("fingerprint");
    assert_ne!(ours.sha256, theirs.sha256);
    let message = remote(&path, client_options(&server, &certs, Codec::F32))
        .expect_err("different weights")
        .to_string();
    assert_eq!(
        message,
        format!(
            "the trunk server runs a different model: server trunk layers 2..28 of 30, sha256 {}, \
             this device's model layers 2..28 of 30, sha256 {}",
            &theirs.hex()[..16],
            &ours.hex()[..16]
        )
    );
    // A layer outside the trunk does not change the trunk's fingerprint.
    assert_eq!(
        lsplit_model::TrunkFingerprint::compute(&source(&altered), 11..28).expect("fingerprint"),
        lsplit_model::TrunkFingerprint::compute(&source(&path), 11..28).expect("fingerprint"),
    );
}

#[test]
fn mutual_tls_requires_a_client_certificate() {
    let path = model_path();
    let certs = certificates();
    let other = DevCertificates::generate(&[]).expect("other certificates");
    let mut options = tls_options(&certs);
    if let Some(tls) = options.access.tls.as_mut() {
        tls.client_ca_pem = Some(certs.ca_pem.clone().into_bytes());
    }
    let server = serve(&path, 2, 28, options);

    let mut client = client_options(&server, &certs, Codec::F32);
    let hint = "(the server refused the TLS session: if it requires mutual TLS, give a client \
                certificate signed by its client CA)";
    let message = connect_error(client.clone());
    assert!(
        message.starts_with("could not connect to the trunk server"),
        "{message}"
    );
    assert!(message.ends_with(hint), "{message}");

    client.identity = Some((
        other.client_pem.clone().into_bytes(),
        other.client_key.clone().into_bytes(),
    ));
    let message = connect_error(client.clone());
    assert!(
        message.starts_with("could not connect to the trunk server"),
        "{message}"
    );
    assert!(message.ends_with(hint), "{message}");

    client.identity = Some((
        certs.client_pem.clone().into_bytes(),
        certs.client_key.clone().into_bytes(),
    ));
    let trunk = remote(&path, client).expect("the CA's client certificate is accepted");
    let model = device_model(&path, 2, 28, Codec::F32);
    assert_eq!(
        generate(&model, Box::new(trunk)),
        in_process(&path, 2, 28, Codec::F32)
    );
}

#[test]
fn codecs_are_negotiated() {
    let path = model_path();
    let certs = certificates();
    let mut options = tls_options(&certs);
    options.codecs = vec![Codec::Bf16, Codec::Int8];
    let server = serve(&path, 2, 28, options);

    let mut client = client_options(&server, &certs, Codec::F32);
    assert_eq!(
        connect_error(client.clone()),
        "the trunk server refused: no codec in common: the device offers [f32], this server \
         serves [bf16, int8] (FailedPrecondition)"
    );
    client.codecs = vec![Codec::F16, Codec::Int8, Codec::Bf16];
    let trunk = lsplit_remote::RemoteTrunk::connect(client).expect("a common codec");
    assert_eq!(trunk.info().codec, Codec::Int8);
}
