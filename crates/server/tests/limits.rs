//! Session slots and transport limits against clients that hold places without using them
//! (silent streams, many streams or connections from one address, health `Watch` floods), and
//! caps on what a client's lists make the server parse or repeat.

mod common;

use std::time::Duration;

use common::*;
use lsplit_proto::pb::session_reply::Kind as ReplyKind;
use lsplit_proto::{PROTOCOL_VERSION, codec_to_pb, pb};
use lsplit_server::{DevCertificates, Limits, TransportLimits};
use lsplit_testkit::wait_until;
use lsplit_wire::Codec;
use tonic::Code;

#[test]
fn two_silent_streams_leave_both_slots_to_a_real_device() {
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let limits = Limits {
        max_sessions: 2,
        ..Limits::default()
    };
    // Long enough that the silent streams are still open while the device runs: the device is
    // served because they hold no slot, not because they were closed.
    let transport = TransportLimits {
        handshake_timeout: Duration::from_secs(600),
        ..TransportLimits::default()
    };
    let server = server(&certs, limits, transport);
    let runtime = runtime();
    let mut silent = runtime.block_on(async {
        let mut client = client(channel(&server, &certs).await.expect("connect"));
        let a = RawStream::silent(&mut client).await.expect("first stream");
        let b = RawStream::silent(&mut client).await.expect("second stream");
        vec![a, b]
    });
    assert_eq!(server.stats.sessions(), 0, "silent streams hold no slot");

    let model = device_model();
    let local = local_tokens(&model);
    let remote = remote_tokens(&model, &server, &certs, Duration::ZERO);
    assert_eq!(remote, local, "the device is served, bit for bit");
    assert_eq!(local.len(), 8);

    // The silent streams were open all along; either can still become a session.
    runtime.block_on(async {
        let stream = &mut silent[0];
        stream.requests.send(open_request()).await.expect("send");
        assert!(matches!(
            stream.next().await,
            Ok(Some(ReplyKind::Opened(_)))
        ));
    });
    assert_eq!(server.stats.sessions(), 1);
}

#[test]
fn a_stream_silent_past_the_handshake_timeout_is_closed() {
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let transport = TransportLimits {
        handshake_timeout: Duration::from_millis(300),
        ..TransportLimits::default()
    };
    let server = server(&certs, Limits::default(), transport);
    runtime().block_on(async {
        let mut client = client(channel(&server, &certs).await.expect("connect"));
        let mut stream = RawStream::silent(&mut client).await.expect("stream");
        let status = stream.next().await.expect_err("the stream is closed");
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert_eq!(
            status.message(),
            "no request within 300 ms of opening the stream: it is closed"
        );
    });
    assert_eq!(server.stats.sessions(), 0);
}

#[test]
fn streams_waiting_for_their_first_request_are_capped_per_address() {
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let transport = TransportLimits {
        handshake_timeout: Duration::from_secs(600),
        max_waiting_streams_per_peer: 2,
        ..TransportLimits::default()
    };
    let server = server(&certs, Limits::default(), transport);
    runtime().block_on(async {
        let mut client = client(channel(&server, &certs).await.expect("connect"));
        let mut first = RawStream::silent(&mut client).await.expect("first stream");
        let _second = RawStream::silent(&mut client).await.expect("second stream");
        let status = RawStream::silent(&mut client)
            .await
            .err()
            .expect("a third silent stream from the same address is refused");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "this address already holds its limit of 2 streams waiting for their first request"
        );
        // A stream that sends its first request no longer waits: there is room again.
        first.requests.send(open_request()).await.expect("send");
        assert!(matches!(first.next().await, Ok(Some(ReplyKind::Opened(_)))));
        RawStream::silent(&mut client)
            .await
            .expect("a new stream fits once one has opened its session");
    });
}

#[test]
fn streams_waiting_for_their_first_request_are_capped_in_total() {
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let transport = TransportLimits {
        handshake_timeout: Duration::from_secs(600),
        max_waiting_streams: 1,
        ..TransportLimits::default()
    };
    let server = server(&certs, Limits::default(), transport);
    runtime().block_on(async {
        let mut client = client(channel(&server, &certs).await.expect("connect"));
        let _waiting = RawStream::silent(&mut client).await.expect("first stream");
        let status = RawStream::silent(&mut client)
            .await
            .err()
            .expect("a second silent stream is refused");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "the server already holds its limit of 1 streams waiting for their first request"
        );
    });
}

#[test]
fn when_the_drain_ends_new_connections_are_refused_and_open_sessions_finish() {
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let trunk = trunk_server(&certs, Limits::default(), TransportLimits::default());
    let runtime = runtime();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let url = format!("https://127.0.0.1:{}", addr.port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let drain = Duration::from_millis(300);
    let served = runtime.spawn(trunk.serve_draining(
        listener,
        async {
            let _ = stopped.await;
        },
        drain,
    ));
    runtime.block_on(async {
        let channel = lsplit_testkit::tls_channel(&url, &certs.ca_pem, None)
            .await
            .expect("connect");
        let mut session = RawStream::silent(&mut client(channel))
            .await
            .expect("stream");
        session.requests.send(open_request()).await.expect("send");
        assert!(matches!(
            session.next().await,
            Ok(Some(ReplyKind::Opened(_)))
        ));

        stop.send(()).expect("shut down");
        tokio::time::sleep(drain * 2).await;
        let refused = tokio::net::TcpStream::connect(addr)
            .await
            .expect_err("the listening socket is closed after the drain");
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        // The session opened before goes on until the device closes it.
        assert!(
            !served.is_finished(),
            "the server waits for its open session"
        );
        drop(session);
        tokio::time::timeout(Duration::from_secs(30), served)
            .await
            .expect("the server stops once its session is closed")
            .expect("join")
            .expect("served");
    });
}

#[test]
fn one_address_holds_at_most_its_share_of_sessions() {
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let transport = TransportLimits {
        max_sessions_per_peer: 1,
        ..TransportLimits::default()
    };
    let server = server(&certs, Limits::default(), transport);
    runtime().block_on(async {
        let mut client = client(channel(&server, &certs).await.expect("connect"));
        let mut first = RawStream::silent(&mut client).await.expect("stream");
        first.requests.send(open_request()).await.expect("send");
        assert!(matches!(first.next().await, Ok(Some(ReplyKind::Opened(_)))));
        let status = RawStream::silent(&mut client)
            .await
            .err()
            .expect("a second session from the same address is refused");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "this address already holds its limit of 1 sessions"
        );
    });
}

#[test]
fn health_watches_and_connections_are_capped() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    let certs = DevCertificates::generate(&[]).expect("certificates");
    let transport = TransportLimits {
        max_health_watches: 1,
        max_connections_per_peer: 1,
        ..TransportLimits::default()
    };
    let server = server(&certs, Limits::default(), transport);
    runtime().block_on(async {
        let channel_one = channel(&server, &certs).await.expect("connect");
        let mut health = HealthClient::new(channel_one.clone());
        let request = || HealthCheckRequest {
            service: "lsplit.trunk.v1.Trunk".into(),
        };
        let mut watch = health.watch(request()).await.expect("watch").into_inner();
        let first = watch.message().await.expect("status").expect("a status");
        assert_eq!(first.status, 1, "SERVING");
        let status = health.watch(request()).await.expect_err("a second watch");
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "the server already answers its limit of 1 health watches"
        );
        // Checks still answer while the watch is held.
        let check = health.check(request()).await.expect("check").into_inner();
        assert_eq!(check.status, 1);

        // A second connection from this address is closed at once.
        let refused = channel(&server, &certs).await;
        assert!(refused.is_err(), "a second connection was served");
        drop((watch, health, channel_one));
    });
    // Once the first connection is gone, its place is free again.
    wait_until(|| runtime().block_on(channel(&server, &certs)).is_ok());
}

#[test]
fn long_codec_lists_are_refused_before_they_are_parsed() {
    let certs = DevCertificates::generate(&[]).expect("certificates");
    let server = server(&certs, Limits::default(), TransportLimits::default());
    runtime().block_on(async {
        let mut client = client(channel(&server, &certs).await.expect("connect"));
        let handshake = |codecs: Vec<i32>| pb::HandshakeRequest {
            protocol_version: PROTOCOL_VERSION,
            codecs,
        };
        let status = client
            .handshake(handshake(vec![99; 1000]))
            .await
            .expect_err("a list of 1000 codecs");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "the device offers 1000 codec values; at most 32 are accepted"
        );
        let mut codecs = vec![99; 31];
        codecs.push(codec_to_pb(Codec::Int8) as i32);
        let reply = client
            .handshake(handshake(codecs))
            .await
            .expect("32 values, one of them known")
            .into_inner();
        assert_eq!(reply.codec, codec_to_pb(Codec::Int8) as i32);
    });
}
