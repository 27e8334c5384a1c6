//! Generates the Rust types and gRPC stubs of `proto/trunk.proto` and `proto/diffusion.proto`
//! with the `protoc` that `protoc-bin-vendored` ships, so that building needs no `protoc` on
//! the machine (a `PROTOC` set in the environment still wins, e.g. where no vendored binary
//! exists for the host).

fn main() -> std::io::Result<()> {
    let mut config = prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path().map_err(std::io::Error::other)?;
        config.protoc_executable(protoc);
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/trunk.proto", "proto/diffusion.proto"],
        &["proto"],
    )
}
