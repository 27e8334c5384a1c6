//! Malformed and hostile image-stream messages sent with the generated client: each gets a gRPC
//! status with a clear message, while a good device's image completes and the server keeps
//! serving.

use std::time::Duration;

use lsplit_diffusion::{UnetSplit, trunk_fingerprint};
use lsplit_proto::diffusion::pb::diffusion_trunk_client::DiffusionTrunkClient;
use lsplit_proto::diffusion::pb::image_reply::Kind as ReplyKind;
use lsplit_proto::diffusion::pb::image_request::Kind as RequestKind;
use lsplit_proto::diffusion::pb::{self, ImageReply, ImageRequest};
use lsplit_proto::diffusion::{DIFFUSION_PROTOCOL_VERSION, tensor_to_pb};
use lsplit_testkit::diffusion::*;
use lsplit_testkit::{
    assert_garbage_refused, assert_status, certificates, raw_channel, send_garbage,
};
use lsplit_wire::StepCodec;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

/// One raw image stream.
struct RawImage {
    requests: mpsc::Sender<ImageRequest>,
    replies: Streaming<ImageReply>,
}

impl RawImage {
    async fn start(client: &mut DiffusionTrunkClient<Channel>) -> Self {
        let (requests, outbound) = mpsc::channel(4);
        let replies = client
            .image(ReceiverStream::new(outbound))
            .await
            .expect("stream")
            .into_inner();
        Self { requests, replies }
    }

    /// Sends `kind` and returns the server's answer.
    async fn send(&mut self, kind: RequestKind) -> Result<ReplyKind, Status> {
        let _ = self.requests.send(ImageRequest { kind: Some(kind) }).await;
        let reply = tokio::time::timeout(Duration::from_secs(60), self.replies.message())
            .await
            .expect("the server answers in time")?;
        Ok(reply.expect("a reply").kind.expect("a reply kind"))
    }
}

#[test]
fn hostile_messages_get_clear_errors_while_a_good_image_completes() {
    let certs = certificates();
    let split = UnetSplit::Lambda(1);
    let mut options = server_options(&certs);
    options.access.token = None;
    options.limits.max_message_bytes = 1 << 20;
    options.limits.max_step_elements = 200_000;
    options.limits.max_attention_bytes = 1 << 20;
    let server = serve("sd15", split, options, 0);
    let fingerprint = trunk_fingerprint(&model_dir("sd15"), split).unwrap();
    let captured = capture("sd15", split);
    let setup_tensors = captured.setup.clone().unwrap().conditioning;
    let step_tensors = captured.steps[0].inputs.clone();
    let expected = in_process("sd15", split, StepCodec::F32, 42).image.data;

    let good = {
        let url = server.url.clone();
        let certs = certs.clone();
        std::thread::spawn(move || {
            let mut options = client_options(&url, &certs);
            options.token = None;
            let mut trunk =
                lsplit_remote::RemoteDiffusionTrunk::connect(options, &[StepCodec::F32])
                    .expect("connect");
            let pipeline = pipeline("sd15", trunk.split(), trunk.codec());
            generate(&pipeline, &request(42), Some(&mut trunk))
                .image
                .data
        })
    };

    let setup = |codec: StepCodec, tensors: &[lsplit_wire::StepTensor]| {
        RequestKind::Setup(pb::Setup {
            protocol_version: DIFFUSION_PROTOCOL_VERSION,
            codec: u32::from(codec.id()),
            fingerprint_sha256: fingerprint.sha256.to_vec(),
            conditioning: tensors.iter().map(tensor_to_pb).collect(),
            guidance: None,
        })
    };
    let step = |tensors: Vec<pb::Tensor>| {
        RequestKind::Step(pb::Step {
            inputs: tensors,
            timestep: None,
        })
    };
    let good_step = || step(step_tensors.iter().map(tensor_to_pb).collect());
    let good_setup = || setup(StepCodec::F32, &setup_tensors);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut client = DiffusionTrunkClient::new(raw_channel(&server.url, &certs).await)
            .max_encoding_message_size(usize::MAX);
        let hidden_shape = step_tensors[0].shape.clone();

        let mut s = RawImage::start(&mut client).await;
        assert_status(
            s.send(good_step()).await,
            Code::FailedPrecondition,
            "a step arrived before the image's setup",
        );

        let mut s = RawImage::start(&mut client).await;
        let mut bad = good_setup();
        if let RequestKind::Setup(setup) = &mut bad {
            setup.conditioning[0].codec = 0x99;
        }
        assert_status(
            s.send(bad).await,
            Code::InvalidArgument,
            "tensor 0: unknown step codec id 153",
        );

        let mut s = RawImage::start(&mut client).await;
        let mut bad = good_setup();
        if let RequestKind::Setup(setup) = &mut bad {
            setup.fingerprint_sha256[0] ^= 1;
        }
        let status = s.send(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(
            status.message().ends_with(&format!(
                "but this server runs UNet lambda:1 trunk sha256 {}",
                fingerprint.hex()
            )),
            "{status:?}"
        );

        // Each malformed step comes after a good setup and step on its stream.
        let mut s = RawImage::start(&mut client).await;
        assert!(matches!(
            s.send(good_setup()).await,
            Ok(ReplyKind::Ready(_))
        ));
        assert!(matches!(
            s.send(good_step()).await,
            Ok(ReplyKind::Output(_))
        ));
        let f16 =
            StepCodec::F16.encode(&step_tensors[1].decode(&candle_core::Device::Cpu).unwrap());
        assert_status(
            s.send(step(vec![
                tensor_to_pb(&step_tensors[0]),
                tensor_to_pb(&f16.unwrap()),
            ]))
            .await,
            Code::InvalidArgument,
            "tensor 1 is encoded in f16 but the session's codec is f32",
        );

        let mut s = RawImage::start(&mut client).await;
        assert!(matches!(
            s.send(good_setup()).await,
            Ok(ReplyKind::Ready(_))
        ));
        let mut truncated = tensor_to_pb(&step_tensors[1]);
        truncated.payload.truncate(10);
        assert_status(
            s.send(step(vec![tensor_to_pb(&step_tensors[0]), truncated]))
                .await,
            Code::InvalidArgument,
            &format!(
                "tensor 1: f32 payload of 10 bytes does not match shape {:?} ({} bytes expected)",
                step_tensors[1].shape,
                step_tensors[1].payload.len()
            ),
        );

        // Within the element limit, but 64x64 positions of attention: 2 x 64² squared x 4
        // bytes = 128 MiB, past the 1 MiB this server allows.
        let mut s = RawImage::start(&mut client).await;
        assert!(matches!(
            s.send(good_setup()).await,
            Ok(ReplyKind::Ready(_))
        ));
        let wide = StepCodec::F32
            .encode(
                &candle_core::Tensor::zeros(
                    (1, 32, 64, 64),
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )
                .unwrap(),
            )
            .unwrap();
        assert_status(
            s.send(step(vec![
                tensor_to_pb(&wide),
                tensor_to_pb(&step_tensors[1]),
            ]))
            .await,
            Code::ResourceExhausted,
            "a step of shape [1, 32, 64, 64] needs 128 MiB for attention, past this trunk's limit \
             of 1 MiB",
        );

        let mut s = RawImage::start(&mut client).await;
        assert!(matches!(
            s.send(good_setup()).await,
            Ok(ReplyKind::Ready(_))
        ));
        let mut nan = tensor_to_pb(&step_tensors[0]);
        nan.payload[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_status(
            s.send(step(vec![nan, tensor_to_pb(&step_tensors[1])]))
                .await,
            Code::InvalidArgument,
            "f32 payload decodes to non-finite value NaN at index [0, 0, 0, 1]",
        );

        let mut s = RawImage::start(&mut client).await;
        assert!(matches!(
            s.send(good_setup()).await,
            Ok(ReplyKind::Ready(_))
        ));
        let giant = pb::Tensor {
            codec: 0,
            shape: vec![1 << 20, 1 << 20, 1 << 20],
            payload: vec![0; 16],
        };
        assert_status(
            s.send(step(vec![giant])).await,
            Code::ResourceExhausted,
            "the message's tensors declare more than 200000 elements (this server's limit per \
             message); tensor 0 has shape [1048576, 1048576, 1048576]",
        );

        let mut s = RawImage::start(&mut client).await;
        assert!(matches!(
            s.send(good_setup()).await,
            Ok(ReplyKind::Ready(_))
        ));
        assert_status(
            s.send(step(vec![tensor_to_pb(&step_tensors[0])])).await,
            Code::InvalidArgument,
            "a step with 1 tensors and timestep None does not fit this lambda:1 trunk",
        );

        let mut s = RawImage::start(&mut client).await;
        assert!(matches!(
            s.send(good_setup()).await,
            Ok(ReplyKind::Ready(_))
        ));
        let mut narrow_shape = hidden_shape.clone();
        narrow_shape[1] /= 2;
        let narrow = lsplit_wire::StepTensor {
            codec: StepCodec::F32,
            payload: vec![0; step_tensors[0].payload.len() / 2],
            shape: narrow_shape.clone(),
        };
        assert_status(
            s.send(step(vec![
                tensor_to_pb(&narrow),
                tensor_to_pb(&step_tensors[1]),
            ]))
            .await,
            Code::InvalidArgument,
            &format!(
                "trunk input {narrow_shape:?}: expected [{}, {}, h, w]",
                hidden_shape[0], hidden_shape[1]
            ),
        );

        let mut s = RawImage::start(&mut client).await;
        let oversized = pb::Tensor {
            codec: 0,
            shape: vec![300_000],
            payload: vec![0; 1_200_000],
        };
        let status = s.send(step(vec![oversized])).await.unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        assert!(
            status
                .message()
                .contains("decoded message length too large"),
            "{status:?}"
        );

        // A second setup on a stream starts a new image.
        let mut s = RawImage::start(&mut client).await;
        assert!(matches!(
            s.send(good_setup()).await,
            Ok(ReplyKind::Ready(_))
        ));
        assert!(matches!(
            s.send(good_setup()).await,
            Ok(ReplyKind::Ready(_))
        ));
        assert!(matches!(
            s.send(good_step()).await,
            Ok(ReplyKind::Output(_))
        ));
        drop(s.requests);
        assert!(s.replies.message().await.expect("a clean end").is_none());

        // Garbage where a protobuf message belongs.
        let channel = raw_channel(&server.url, &certs).await;
        assert_garbage_refused(
            send_garbage(channel, "/lsplit.diffusion.v1.DiffusionTrunk/Image").await,
        );
    });

    assert!(
        good.join().expect("good device") == expected,
        "the good image is unchanged"
    );
    let mut options = client_options(&server.url, &certs);
    options.token = None;
    let mut trunk =
        lsplit_remote::RemoteDiffusionTrunk::connect(options, &[StepCodec::F32]).expect("connect");
    let pipeline = pipeline("sd15", trunk.split(), trunk.codec());
    assert!(
        generate(&pipeline, &request(42), Some(&mut trunk))
            .image
            .data
            == expected
    );
    let metrics = server.stats.prometheus();
    assert!(
        metrics.contains("lsplit_session_errors_total 12\n"),
        "{metrics}"
    );
}

#[test]
fn image_sessions_past_the_limit_are_refused() {
    let certs = certificates();
    let mut options = server_options(&certs);
    options.access.token = None;
    options.limits.max_sessions = 1;
    let server = serve("sd15", UnetSplit::Component, options, 0);
    let fingerprint = trunk_fingerprint(&model_dir("sd15"), UnetSplit::Component).unwrap();
    let setup = capture("sd15", UnetSplit::Component).setup.unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut client = DiffusionTrunkClient::new(raw_channel(&server.url, &certs).await);
        // A stream takes its slot with its first request, a setup here.
        let mut first = RawImage::start(&mut client).await;
        let ready = first
            .send(RequestKind::Setup(pb::Setup {
                protocol_version: DIFFUSION_PROTOCOL_VERSION,
                codec: u32::from(StepCodec::F32.id()),
                fingerprint_sha256: fingerprint.sha256.to_vec(),
                conditioning: setup.conditioning.iter().map(tensor_to_pb).collect(),
                guidance: setup.guidance,
            }))
            .await;
        assert!(matches!(ready, Ok(ReplyKind::Ready(_))), "{ready:?}");
        let (_requests, outbound) = mpsc::channel::<ImageRequest>(1);
        let status = client
            .image(ReceiverStream::new(outbound))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "the server already serves its limit of 1 image sessions"
        );
        // Once the slot is free, a new stream opening with a step is refused for that.
        drop(first);
        while server.stats.sessions() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut first = RawImage::start(&mut client).await;
        assert_status(
            first
                .send(RequestKind::Step(pb::Step {
                    inputs: vec![],
                    timestep: Some(1.0),
                }))
                .await,
            Code::FailedPrecondition,
            "a step arrived before the image's setup",
        );
    });
}
