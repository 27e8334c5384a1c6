//! `lsplit`: run a generative model split between this device and a (possibly remote) trunk.

mod args;
mod commands;
mod device;
mod signal;

use clap::{Parser, Subcommand};

/// Privacy-preserving split computing for generative AI.
///
/// The model is cut into a head and a tail that run on this device and a trunk (the heavy
/// middle) that runs in the cloud; only hidden states cross between them.
#[derive(Debug, Parser)]
#[command(name = "lsplit", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text, streaming it to stdout.
    Generate(commands::generate::GenerateArgs),
    /// Draw an image with Stable Diffusion, the UNet split between this device and a trunk.
    Image(commands::image::ImageArgs),
    /// Show what each part of a split holds: layers, tensors, parameters, bytes.
    Inspect(commands::inspect::InspectArgs),
    /// Measure prefill and decode speed, unsplit and split, in one run.
    Bench(commands::bench::BenchArgs),
    /// Download and verify the default model into the cache, and print its path.
    Fetch,
    /// Serve the trunk layers of a split model to devices over gRPC and TLS.
    Serve(commands::serve::ServeArgs),
    /// Serve the model on this device as an OpenAI-compatible API and a web page.
    Edge(commands::edge::EdgeArgs),
    /// Read a wire capture with the public weights: how much text the hidden states give away.
    Attack(commands::attack::AttackArgs),
    /// Write a development CA, server certificate and client certificate for `serve`.
    Cert(commands::cert::CertArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LSPLIT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match Cli::parse().command {
        Command::Generate(args) => commands::generate::run(args),
        Command::Image(args) => commands::image::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Fetch => commands::fetch::run(),
        Command::Serve(args) => commands::serve::run(args),
        Command::Cert(args) => commands::cert::run(args),
        Command::Edge(args) => commands::edge::run(args),
        Command::Attack(args) => commands::attack::run(args),
    }
}
