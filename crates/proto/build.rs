//! Generates the Rust types and gRPC clients of `proto/trunk.proto` and `proto/diffusion.proto`
//! with the `protoc` that `protoc-bin-vendored` ships, so that building needs no `protoc` on
//! the machine (a `PROTOC` set in the environment still wins, e.g. where no vendored binary
//! exists for the host).
//!
//! Each service also gets a unit struct implementing `lsplit_proto::Service`, naming its gRPC
//! paths and its four message types straight from the .proto, so that the generic client (in
//! lsplit-remote) and server (in lsplit-server) serve every model kind without restating them.

use prost_build::{Method, Service, ServiceGenerator};

/// tonic's client generator, followed by the `Service` description of each service.
struct Described {
    tonic: Box<dyn ServiceGenerator>,
}

impl ServiceGenerator for Described {
    fn generate(&mut self, service: Service, buf: &mut String) {
        buf.push_str(&describe(&service));
        self.tonic.generate(service, buf);
    }

    fn finalize(&mut self, buf: &mut String) {
        self.tonic.finalize(buf);
    }

    fn finalize_package(&mut self, package: &str, buf: &mut String) {
        self.tonic.finalize_package(package, buf);
    }
}

/// The unit struct and `Service` impl of `service`, which must be a unary `Handshake` and one
/// bidirectional stream (the shape both ends are written for); any other shape stops the build,
/// as handshake messages without `protocol_version` do.
fn describe(service: &Service) -> String {
    let [handshake, session] = service.methods.as_slice() else {
        panic!(
            "service {} has {} methods; the generic client and server expect Handshake and one session stream",
            service.proto_name,
            service.methods.len()
        );
    };
    let unary = |m: &Method| !m.client_streaming && !m.server_streaming;
    assert!(
        handshake.proto_name == "Handshake" && unary(handshake),
        "service {}: the first method must be the unary Handshake",
        service.proto_name
    );
    assert!(
        session.client_streaming && session.server_streaming,
        "service {}: {} must stream both ways",
        service.proto_name,
        session.proto_name
    );
    format!(
        "/// The `{name}` service of `{package}`: its gRPC paths and messages.\n\
         #[derive(Debug, Clone, Copy)]\n\
         pub struct {rust};\n\
         impl crate::Service for {rust} {{\n\
             const NAME: &'static str = \"{package}.{name}\";\n\
             const SESSION: &'static str = \"{method}\";\n\
             type Hello = {hello};\n\
             type Welcome = {welcome};\n\
             type Request = {request};\n\
             type Reply = {reply};\n\
             fn hello_version(hello: &{hello}) -> u32 {{ hello.protocol_version }}\n\
             fn welcome_version(welcome: &{welcome}) -> u32 {{ welcome.protocol_version }}\n\
         }}\n",
        name = service.proto_name,
        package = service.package,
        rust = service.name,
        method = session.proto_name,
        hello = handshake.input_type,
        welcome = handshake.output_type,
        request = session.input_type,
        reply = session.output_type,
    )
}

fn main() -> std::io::Result<()> {
    let mut config = prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path().map_err(std::io::Error::other)?;
        config.protoc_executable(protoc);
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    // Printing any rerun line turns off cargo's default of rerunning on every file change.
    for file in ["build.rs", "proto/trunk.proto", "proto/diffusion.proto"] {
        println!("cargo:rerun-if-changed={file}");
    }
    // The servers are one generic service in lsplit-server; tests still call the clients.
    let tonic = tonic_prost_build::configure()
        .build_server(false)
        .service_generator();
    config.service_generator(Box::new(Described { tonic }));
    config.out_dir(std::env::var("OUT_DIR").map_err(std::io::Error::other)?);
    config.compile_protos(&["proto/trunk.proto", "proto/diffusion.proto"], &["proto"])
}
