//! The waits between reconnection attempts: exponential, with jitter.
//!
//! A dozen lines rather than the `backon` crate: the retry loop in [`crate::link`] rebuilds the
//! stream between attempts and bounds the total time spent, so it only needs the next wait.

use std::time::Duration;

/// The first wait.
const FIRST: Duration = Duration::from_millis(100);
/// The longest wait.
const LONGEST: Duration = Duration::from_secs(2);

/// Waits that double from 100 ms up to 2 s, each drawn uniformly from the upper half of its
/// bound, so devices that lost the same server do not all come back at the same instant.
#[derive(Debug)]
pub(crate) struct Backoff {
    bound: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self { bound: FIRST }
    }

    /// The next wait.
    pub(crate) fn next_wait(&mut self) -> Duration {
        let bound = self.bound;
        self.bound = (bound * 2).min(LONGEST);
        let millis = bound.as_millis() as u64;
        Duration::from_millis(rand::random_range(millis / 2..=millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_longest_within_their_jitter() {
        let mut backoff = Backoff::new();
        for bound in [100, 200, 400, 800, 1600, 2000, 2000] {
            let wait = backoff.next_wait().as_millis() as u64;
            assert!((bound / 2..=bound).contains(&wait), "{wait} ms for {bound}");
        }
    }
}
