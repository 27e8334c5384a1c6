//! What a hostile client needs: raw frames, a bare TLS channel, and exact status checks.

use std::time::Duration;

use lsplit_server::DevCertificates;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

/// A gRPC codec that sends frames as given: bytes that need not be a protobuf message at all,
/// for tests of what a server does with a hostile client's garbage.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> Self::Encoder {
        RawBytes
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let len = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, len).to_vec()))
    }
}

/// A TLS channel to `url` trusting `certs`' CA, for clients that speak the protocol by hand.
pub async fn raw_channel(url: &str, certs: &DevCertificates) -> Channel {
    tls_channel(url, &certs.ca_pem, None)
        .await
        .expect("connect")
}

/// A TLS connection to `url`, trusting the CA `ca_pem`, from the local address `local` when
/// given (any loopback address works on Linux, so a test can be several peers).
pub async fn tls_channel(
    url: &str,
    ca_pem: &str,
    local: Option<std::net::IpAddr>,
) -> Result<Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    Endpoint::from_shared(url.to_owned())?
        .tls_config(tls)?
        .local_address(local)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Asserts that a server answered with exactly `code` and `message`.
pub fn assert_status<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, message: &str) {
    match result {
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert_eq!(status.message(), message);
        }
        Ok(reply) => panic!("expected {code:?} `{message}`, got {reply:?}"),
    }
}

/// Opens a stream on the gRPC method at `path` and sends bytes that are no protobuf message;
/// the status the server ends it with.
pub async fn send_garbage(channel: Channel, path: &'static str) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let garbage = vec![0xff, 0xfe, 0x07, 0x00, 0x13, 0x37, 0xde, 0xad];
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    let request = tonic::Request::new(tokio_stream::iter(vec![garbage]));
    let response = match grpc.streaming(request, path, RawBytes).await {
        Err(status) => return status,
        Ok(response) => response,
    };
    let mut replies = response.into_inner();
    match tokio::time::timeout(Duration::from_secs(10), replies.message())
        .await
        .expect("an answer in time")
    {
        Err(status) => status,
        Ok(reply) => panic!("garbage was answered with {reply:?}"),
    }
}

/// Asserts that `status` is the refusal of bytes that do not decode as the expected message.
pub fn assert_garbage_refused(status: Status) {
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("failed to decode Protobuf message"),
        "{status:?}"
    );
}
