//! Stop sequences over streamed text: text that might begin a stop sequence is held back until
//! the next pieces show whether it does, so no part of a stop sequence is ever sent.

/// Filters streamed pieces against the request's stop sequences.
#[derive(Debug)]
pub(crate) struct StopFilter {
    stops: Vec<String>,
    pending: String,
    stopped: bool,
}

impl StopFilter {
    /// A filter for `stops` (none: every piece passes through at once).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            pending: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop sequence was found.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds a piece; returns the text that is now safe to send. After a stop sequence is found
    /// everything else is dropped.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.pending.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter_map(|stop| self.pending.find(stop.as_str()))
            .min();
        if let Some(at) = found {
            self.stopped = true;
            self.pending.truncate(at);
            return std::mem::take(&mut self.pending);
        }
        let keep = self.longest_stop_prefix_suffix();
        let safe = self.pending.len() - keep;
        let rest = self.pending.split_off(safe);
        std::mem::replace(&mut self.pending, rest)
    }

    /// The text still held back, once generation has ended without a stop sequence.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            String::new()
        } else {
            std::mem::take(&mut self.pending)
        }
    }

    /// Length of the longest end of `pending` that a stop sequence starts with.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let mut longest = 0;
        for stop in &self.stops {
            for (at, _) in self.pending.char_indices() {
                let tail = &self.pending[at..];
                if tail.len() > longest && stop.starts_with(tail) {
                    longest = tail.len();
                    break;
                }
            }
        }
        longest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut filter = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out: Vec<String> = pieces.iter().map(|p| filter.push(p)).collect();
        out.push(filter.finish());
        (out, filter.stopped())
    }

    #[test]
    fn no_stops_passes_everything_at_once() {
        assert_eq!(
            run(&[], &["a", "b"]),
            (vec!["a".into(), "b".into(), "".into()], false)
        );
    }

    #[test]
    fn a_stop_split_across_pieces_is_never_sent() {
        let (out, stopped) = run(&["END"], &["The e", "nd. E", "N", "D and more"]);
        assert!(stopped);
        assert_eq!(out, vec!["The e", "nd. ", "", "", ""]);
        assert_eq!(out.concat(), "The end. ");
    }

    #[test]
    fn a_false_start_is_released() {
        let (out, stopped) = run(&["\n\n"], &["line\n", "next", "\n"]);
        assert!(!stopped);
        assert_eq!(out, vec!["line", "\nnext", "", "\n"]);
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_multibyte_text_is_kept_whole() {
        let (out, stopped) = run(&["ß!", "é"], &["aéß!"]);
        assert!(stopped);
        assert_eq!(out.concat(), "a");
        let (out, stopped) = run(&["ßx"], &["éß", "y"]);
        assert!(!stopped);
        assert_eq!(out, vec!["é", "ßy", ""]);
    }
}
