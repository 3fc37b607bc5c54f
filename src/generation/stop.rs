//! Stop strings over streamed text.
//!
//! Text that could still turn into a stop string is withheld until it is resolved: either the
//! stop string completes (generation stops and the text before it is emitted, the stop string
//! itself is not) or the text diverges (it is emitted). The concatenation of everything emitted
//! is therefore exactly the generated text up to the first stop string.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text safe to emit now (possibly empty while a partial match is pending).
    Continue(String),
    /// A stop string completed: emit `text` (everything before the stop string) and stop.
    Stopped { text: String, stop: String },
}

#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Feeds newly generated text.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(text.to_string());
        }
        self.pending.push_str(text);
        // The earliest completed stop string wins; among those starting together, the longest.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|i| (i, s)))
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.len().cmp(&a.1.len())));
        if let Some((i, stop)) = hit {
            let stop = stop.clone();
            let text = self.pending[..i].to_string();
            self.pending.clear();
            return StopOutcome::Stopped { text, stop };
        }
        let keep = self.longest_partial_suffix();
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopOutcome::Continue(out)
    }

    /// Generation ended for another reason: the withheld text is emitted.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Bytes of the longest suffix of `pending` that is a proper prefix of some stop string.
    fn longest_partial_suffix(&self) -> usize {
        let p = &self.pending;
        let mut best = 0;
        for (start, _) in p.char_indices() {
            let suffix = &p[start..];
            if suffix.len() <= best {
                break;
            }
            if self
                .stops
                .iter()
                .any(|s| s.len() > suffix.len() && s.starts_with(suffix))
            {
                best = suffix.len();
                break;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let mut s = StopStrings::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match s.push(p) {
                StopOutcome::Continue(t) => out.push_str(&t),
                StopOutcome::Stopped { text, stop } => {
                    out.push_str(&text);
                    return (out, Some(stop));
                }
            }
        }
        out.push_str(&s.flush());
        (out, None)
    }

    #[test]
    fn no_stops_passes_text_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), None));
    }

    #[test]
    fn stop_split_across_pieces_is_withheld_then_cut() {
        assert_eq!(
            run(&["STOP"], &["hello S", "T", "OP and more"]),
            ("hello ".into(), Some("STOP".into()))
        );
    }

    #[test]
    fn partial_match_that_diverges_is_emitted_in_full() {
        let mut s = StopStrings::new(vec!["\n\n".into()]);
        assert_eq!(s.push("a\n"), StopOutcome::Continue("a".into()));
        assert_eq!(s.push("b"), StopOutcome::Continue("\nb".into()));
        assert_eq!(run(&["abc"], &["ab", "ab", "x"]), ("ababx".into(), None));
    }

    #[test]
    fn pending_partial_is_flushed_at_the_end() {
        assert_eq!(run(&["END"], &["the E", "N"]), ("the EN".into(), None));
    }

    #[test]
    fn earliest_stop_wins() {
        assert_eq!(
            run(&["world", "lo"], &["hello world"]),
            ("hel".into(), Some("lo".into()))
        );
    }

    #[test]
    fn multibyte_text_and_stops_are_cut_on_char_boundaries() {
        assert_eq!(
            run(&["日本"], &["こんにちは日", "本語"]),
            ("こんにちは".into(), Some("日本".into()))
        );
        assert_eq!(run(&["🎉!"], &["a🎉", "b"]), ("a🎉b".into(), None));
    }

    #[test]
    fn stop_at_the_very_start_emits_nothing() {
        assert_eq!(run(&["x"], &["xyz"]), ("".into(), Some("x".into())));
    }
}
