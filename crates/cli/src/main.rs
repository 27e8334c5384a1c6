//! `lsplit`: run a generative model split between this device and a (possibly remote) trunk.

mod args;
mod commands;
mod signal;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::args::LogFormat;

/// Split computing for generative AI; the split does not hide the text from the trunk's operator.
///
/// The model is cut into a head and a tail that run on this device and a trunk (the heavy
/// middle) that runs in the cloud; only hidden states cross between them, and with the public
/// weights they give the prompt and the reply back, under every defence measured that leaves
/// the model usable (PRIVACY.md: `lsplit attack --table`).
#[derive(Debug, Parser)]
#[command(name = "lsplit", version, about)]
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
    /// Train a LoRA adapter on the device's layers on your own data, the trunk computing its
    /// forward and backward passes in-process or on a trunk server.
    Finetune(commands::finetune::FinetuneArgs),
    /// Show what each part of a split holds: layers, tensors, parameters, bytes.
    Inspect(commands::inspect::InspectArgs),
    /// Measure prefill and decode speed, unsplit and split, in one run.
    Bench(commands::bench::BenchArgs),
    /// Check the trunk on a device (a GPU) against the CPU's: greedy agreement, largest logit
    /// difference, batched against solo, and trunk steps/s with many sessions.
    TrunkCheck(commands::trunk_check::TrunkCheckArgs),
    /// Download and verify the default model into the cache, and print its path.
    Fetch,
    /// Serve the trunk layers of a split model to devices over gRPC and TLS.
    Serve(commands::serve::ServeArgs),
    /// Ask a trunk server's gRPC health service whether it serves (exit status 0 only if so).
    Health(commands::health::HealthArgs),
    /// Serve the model on this device as an OpenAI-compatible API and a web page.
    Edge(commands::edge::EdgeArgs),
    /// Read a wire capture with the public weights: how much text the hidden states give away.
    Attack(commands::attack::AttackArgs),
    /// Write a development CA, server certificate and client certificate for `serve`.
    Cert(commands::cert::CertArgs),
    /// Print a shell completion script, e.g. `lsplit completions bash > ~/.local/share/bash-completion/completions/lsplit`.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
}

impl Command {
    /// How this command writes its log: `--log-format` of `serve` and `edge`, text elsewhere.
    fn log_format(&self) -> LogFormat {
        match self {
            Command::Serve(args) => args.log.log_format,
            Command::Edge(args) => args.log.log_format,
            _ => LogFormat::Text,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let command = parse().command;
    args::init_logging(command.log_format());
    if !matches!(command, Command::Serve(_)) {
        one_malloc_arena();
    }
    match command {
        Command::Generate(args) => commands::generate::run(args),
        Command::Image(args) => commands::image::run(args),
        Command::Finetune(args) => commands::finetune::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::TrunkCheck(args) => commands::trunk_check::run(args),
        Command::Fetch => commands::fetch::run(),
        Command::Serve(args) => commands::serve::run(args),
        Command::Health(args) => commands::health::run(args),
        Command::Cert(args) => commands::cert::run(args),
        Command::Edge(args) => commands::edge::run(args),
        Command::Attack(args) => commands::attack::run(args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "lsplit", &mut std::io::stdout());
            Ok(())
        }
    }
}

/// The command line, with `--version` naming the kernels this CPU runs (chosen at run time),
/// e.g. `lsplit 0.1.0 (kernels: avx512-vnni)`.
fn parse() -> Cli {
    let version = format!(
        "{} (kernels: {})",
        env!("CARGO_PKG_VERSION"),
        lsplit_model::KernelPath::active()
    );
    let matches = Cli::command().version(version).get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// On the device, keeps glibc's allocator to one arena. glibc gives each thread that allocates
/// an arena of its own and keeps freed memory in each; forward passes run on the compute pool's
/// threads, so each kept a copy of a prompt's temporaries (peak RSS of a 1000-token prompt:
/// 240 MiB against 215 MiB with one arena). The server keeps glibc's default, for its many
/// threads allocating at once.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn one_malloc_arena() {
    // SAFETY: mallopt only sets an allocator parameter; it runs before any other thread starts.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } != 1 {
        tracing::debug!("glibc refused a single malloc arena");
    }
}

/// Other platforms' allocators are left as they are.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn one_malloc_arena() {}
