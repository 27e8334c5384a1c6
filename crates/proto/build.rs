//! Generates the Rust types and gRPC stubs of `proto/trunk.proto` and `proto/diffusion.proto`
//! with `protoc`.

fn main() -> std::io::Result<()> {
    tonic_prost_build::configure()
        .compile_protos(&["proto/trunk.proto", "proto/diffusion.proto"], &["proto"])
}
