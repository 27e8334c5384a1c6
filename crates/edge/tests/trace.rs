//! The trace the page draws is what really crossed: in-process, on the real default model, the
//! rows and byte counts a streamed reply reports equal those the trunk received and returned,
//! and the session count goes back to zero when the reply ends.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use base64::Engine;
use lsplit_device::{Device, TrunkSource};
use lsplit_edge::{EdgeConfig, EdgeServer};
use lsplit_model::{ModelSource, SplitPlan};
use lsplit_split::{
    DeviceModel, GenerateOptions, LocalTrunk, Obfuscation, SplitPolicy, StepRows, Trunk,
    TrunkError, load_tokenizer,
};
use lsplit_wire::{Codec, HiddenRows};
use serde_json::Value;

/// Rows the trunk received and returned, in order.
type Log = Arc<Mutex<Vec<(HiddenRows, HiddenRows)>>>;

/// The in-process trunk, keeping a copy of every exchange.
struct Recording {
    inner: LocalTrunk,
    log: Log,
}

impl Trunk for Recording {
    fn layers(&self) -> Range<usize> {
        self.inner.layers()
    }

    fn step(&mut self, message: &StepRows) -> Result<StepRows, TrunkError> {
        let out = self.inner.step(message)?;
        self.log
            .lock()
            .expect("log")
            .push((message.rows.clone(), out.rows.clone()));
        Ok(out)
    }
}

fn serve(log: Log) -> (EdgeServer, SocketAddr, tokio::runtime::Runtime) {
    let path = lsplit_fetch::ensure_default_model().expect("default model");
    let source = ModelSource::open(&path).expect("open");
    let tokenizer = Arc::new(load_tokenizer(&source).expect("tokenizer"));
    let device = candle_core::Device::Cpu;
    let plan = SplitPlan::new(3, 27, source.config().num_layers).expect("plan");
    let model = DeviceModel::split(
        &source,
        SplitPolicy::fixed(plan),
        tokenizer,
        Codec::F32,
        &device,
    )
    .expect("model");
    let trunk = Arc::new(source.load_part(&plan.trunk(), &device).expect("trunk"));
    let trunks = TrunkSource::Custom {
        location: "in-process".into(),
        open: Box::new(move |keys| {
            Ok(Box::new(Recording {
                inner: LocalTrunk::new(Arc::clone(&trunk), keys)?,
                log: Arc::clone(&log),
            }) as Box<dyn Trunk>)
        }),
    };
    let server = EdgeServer::new(EdgeConfig {
        device: Device::new(path, model, Some(trunks), Obfuscation::None),
        model_id: "smol".into(),
        aliases: Vec::new(),
        defaults: GenerateOptions::default(),
        api_key: None,
        max_sessions: 2,
        images: None,
    });
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    runtime.spawn(server.clone().serve(listener, std::future::pending()));
    (server, addr, runtime)
}

/// The `data:` payloads of a streamed chat reply.
fn stream_chat(addr: SocketAddr, body: &str) -> Vec<Value> {
    let mut stream = TcpStream::connect(addr).expect("connect");
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    response
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("chunk"))
        .collect()
}

fn rows_of(view: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(view["f32_base64"].as_str().expect("rows"))
        .expect("base64")
}

#[test]
fn the_streamed_trace_is_what_crossed_the_wire() {
    let log: Log = Arc::default();
    let (server, addr, _runtime) = serve(Arc::clone(&log));
    let chunks = stream_chat(
        addr,
        r#"{"messages": [{"role": "user", "content": "Name three colors."}],
            "max_tokens": 8, "stream": true, "lsplit_trace": true}"#,
    );
    // The generation thread frees its slot right after its last event.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.sessions_open() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the session outlived its reply"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let exchanges = log.lock().expect("log");
    let traces: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c.get("lsplit"))
        .filter(|t| t.get("index").is_some())
        .collect();
    assert_eq!(traces.len(), 8, "one trace per token");
    // The 8th token is sampled but never sent: 8 tokens, 8 exchanges (prompt + 7 steps).
    assert_eq!(exchanges.len(), 8);
    let prompt_rows = exchanges[0].0.rows;
    for (i, (trace, (up, down))) in traces.iter().zip(exchanges.iter()).enumerate() {
        assert_eq!(trace["index"], i);
        let rows = if i == 0 { prompt_rows } else { 1 };
        assert_eq!(trace["positions"], rows);
        assert_eq!(trace["bytes_up"], up.bytes.len());
        assert_eq!(trace["bytes_down"], down.bytes.len());
        assert_eq!(up.bytes.len(), rows * 576 * 4);
        for (view, sent) in [(&trace["up"], up), (&trace["down"], down)] {
            assert_eq!(view["codec"], "f32");
            assert_eq!(view["start"], sent.start);
            assert_eq!(view["rows"], sent.rows);
            assert_eq!(view["width"], 576);
            assert_eq!(view["wire_bytes"], sent.bytes.len());
            // f32 rows are sent as their little-endian bytes: the trace holds the same bytes
            // (the last rows of a prompt block).
            let shown = view["shown_rows"].as_u64().expect("shown") as usize;
            assert_eq!(shown, sent.rows.min(32));
            let tail = &sent.bytes[(sent.rows - shown) * 576 * 4..];
            assert_eq!(rows_of(view), tail, "token {i}");
        }
    }
    let last = chunks.last().expect("chunks");
    let summary = &last["lsplit"]["summary"];
    let sent: usize = exchanges.iter().map(|(up, _)| up.bytes.len()).sum();
    assert_eq!(summary["bytes_up"], sent);
    assert_eq!(last["choices"][0]["finish_reason"], "length");
}
