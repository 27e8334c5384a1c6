//! `lsplit fetch`: make sure the default model is in the cache.

/// Fetches (or finds) the default model and prints its path.
pub fn run() -> anyhow::Result<()> {
    let path = lsplit_fetch::ensure_default_model_with_progress()?;
    println!("{}", path.display());
    Ok(())
}
