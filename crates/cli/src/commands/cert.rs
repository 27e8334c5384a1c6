//! `lsplit cert`: a development CA, server certificate and client certificate for `lsplit serve`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use lsplit_server::DevCertificates;

/// Options of `lsplit cert`.
#[derive(Debug, Args)]
pub struct CertArgs {
    /// Directory to write ca.pem, server.pem, server.key, client.pem and client.key into
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Another DNS name or IP address the server certificate is valid for, besides localhost
    /// and 127.0.0.1 (repeatable)
    #[arg(long = "host", value_name = "NAME")]
    pub hosts: Vec<String>,
}

/// Runs the command; existing files are never overwritten.
pub fn run(args: CertArgs) -> anyhow::Result<()> {
    let certs = DevCertificates::generate(&args.hosts)?;
    let files = [
        ("ca.pem", &certs.ca_pem, false),
        ("server.pem", &certs.server_pem, false),
        ("server.key", &certs.server_key, true),
        ("client.pem", &certs.client_pem, false),
        ("client.key", &certs.client_key, true),
    ];
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    if let Some((name, _, _)) = files
        .iter()
        .find(|(name, _, _)| args.out.join(name).exists())
    {
        anyhow::bail!(
            "{} already exists: choose another --out directory or remove the old files",
            args.out.join(name).display()
        );
    }
    for (name, pem, secret) in files {
        write(&args.out.join(name), pem, secret)?;
    }
    println!(
        "wrote ca.pem, server.pem, server.key, client.pem, client.key to {}",
        args.out.display()
    );
    Ok(())
}

/// Writes `pem`; private keys are readable by their owner only.
fn write(path: &Path, pem: &str, secret: bool) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut file, pem.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
