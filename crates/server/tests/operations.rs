//! The health service and the Prometheus metrics of a running trunk server.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use lsplit_remote::{ServingStatus, TRUNK_SERVICE};
use lsplit_testkit::certificates;
use lsplit_testkit::llm::*;
use lsplit_wire::Codec;

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

fn scrape(addr: std::net::SocketAddr, path: &str) -> String {
    let mut socket = TcpStream::connect(addr).expect("connect to metrics");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(socket, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("request");
    let mut response = String::new();
    socket.read_to_string(&mut response).expect("response");
    response
}

#[test]
fn health_and_metrics_report_the_served_sessions() {
    let path = model_path();
    let certs = certificates();
    let mut options = tls_options(&certs);
    options.access.token = Some("health needs no token".into());
    let server = serve(&path, 2, 28, options);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    // Health needs no token: the device's options here carry none.
    let status =
        lsplit_remote::check_health(&client_options(&server, &certs, Codec::F16), TRUNK_SERVICE)
            .expect("health check");
    assert_eq!(status, ServingStatus::Serving);

    let listener = runtime.block_on(async {
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
    });
    let metrics_addr = listener.local_addr().expect("address");
    runtime.spawn(lsplit_server::serve_metrics(
        listener,
        server.stats.clone(),
        std::future::pending(),
    ));

    let mut client = client_options(&server, &certs, Codec::F16);
    client.token = Some("health needs no token".into());
    let model = device_model(&path, 2, 28, Codec::F16);
    let prompt_len = model.prompt_tokens(PROMPT, true).expect("prompt").len() as u64;
    let tokens = generate(&model, Box::new(remote(&path, client).expect("connect")));
    assert_eq!(tokens.len(), MAX_TOKENS);

    let response = scrape(metrics_addr, "/metrics");
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    let body = &response[response.find("\r\n\r\n").expect("headers end") + 4..];
    let steps = MAX_TOKENS as u64;
    let rows = prompt_len + steps - 1;
    assert_eq!(metric(body, "lsplit_sessions_total"), 1);
    assert_eq!(metric(body, "lsplit_steps_total"), steps);
    assert_eq!(metric(body, "lsplit_rows_total"), rows);
    assert_eq!(
        metric(body, "lsplit_payload_bytes_total{direction=\"in\"}"),
        rows * 576 * 2
    );
    assert_eq!(
        metric(body, "lsplit_payload_bytes_total{direction=\"out\"}"),
        rows * 576 * 2
    );
    assert_eq!(metric(body, "lsplit_step_seconds_count"), steps);
    assert_eq!(
        metric(body, "lsplit_step_seconds_bucket{le=\"+Inf\"}"),
        steps
    );
    assert!(
        body.contains("# TYPE lsplit_step_seconds histogram"),
        "{body}"
    );
    assert!(scrape(metrics_addr, "/").starts_with("HTTP/1.1 404 Not Found\r\n"));

    // Clients that send nothing, or never finish their request, are cut off rather than
    // holding their sockets; the endpoint still answers afterwards.
    let mut silent = TcpStream::connect(metrics_addr).expect("connect");
    let mut slow = TcpStream::connect(metrics_addr).expect("connect");
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .expect("half a request");
    for socket in [&mut silent, &mut slow] {
        socket
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        let mut byte = [0u8; 1];
        let read = socket
            .read(&mut byte)
            .expect("the server closes the connection");
        assert_eq!(read, 0, "closed without an answer");
    }
    assert!(scrape(metrics_addr, "/metrics").starts_with("HTTP/1.1 200 OK\r\n"));
}
