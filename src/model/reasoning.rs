//! Reasoning ("thinking") text: the `<think>…</think>` block that reasoning models (Qwen3,
//! DeepSeek-R1 distills, QwQ) write before their answer.
//!
//! Like llama-server and vLLM, we return that block as `reasoning_content` and the rest as
//! `content`. Some templates open the block in the generation prompt (DeepSeek-R1 distills end
//! the prompt with `<think>\n`), so the generated text may start inside it without the opening
//! tag: [`prompt_opens_thinking`] tells the caller which case it has.
//!
//! Rules, the same for whole text ([`split_reasoning`]) and streamed text ([`ReasoningStream`]),
//! because the former is the latter fed in one piece:
//! - the block is recognised only at the start of the reply (after leading whitespace); a
//!   `<think>` later in the text is ordinary content;
//! - reasoning is trimmed of leading and trailing whitespace, and whitespace right after
//!   `</think>` is dropped from content (llama-server does the same);
//! - an unclosed block at the end of the text makes everything after `<think>` reasoning.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// A reply split into its reasoning and its answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReasoningSplit {
    pub reasoning: String,
    pub content: String,
}

/// Splits a whole reply. `starts_inside`: the prompt already opened the block (see
/// [`prompt_opens_thinking`]), so the text starts inside it.
pub fn split_reasoning(text: &str, starts_inside: bool) -> ReasoningSplit {
    ReasoningStream::new(starts_inside).split_pieces(&[text])
}

/// Whether the rendered prompt leaves a `<think>` block open for the model to continue.
///
/// Only a prompt that *ends* with `<think>` (trailing whitespace ignored) counts: that is how
/// templates force thinking on, and a literal `<think>` in an earlier user message must not
/// make us treat the whole answer as reasoning.
pub fn prompt_opens_thinking(rendered_prompt: &str) -> bool {
    rendered_prompt.trim_end().ends_with(OPEN)
}

/// Whether the chat template knows thinking tags, so reasoning extraction applies to its
/// model. Templates of reasoning models mention `</think>` at least to strip old reasoning
/// from the history.
pub fn template_thinks(template_source: &str) -> bool {
    template_source.contains(CLOSE)
}

/// One piece of streamed output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReasoningDelta {
    Reasoning(String),
    Content(String),
}

impl Extend<ReasoningDelta> for ReasoningSplit {
    fn extend<I: IntoIterator<Item = ReasoningDelta>>(&mut self, deltas: I) {
        for delta in deltas {
            match delta {
                ReasoningDelta::Reasoning(text) => self.reasoning.push_str(&text),
                ReasoningDelta::Content(text) => self.content.push_str(&text),
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first non-whitespace text: is it `<think>`?
    Start,
    /// Inside the block; `at_start` while only whitespace has been seen.
    Inside { at_start: bool },
    /// Right after `</think>`, dropping whitespace.
    AfterClose,
    /// The answer: everything passes through.
    Content,
}

/// Splits a reply fed delta by delta. Text that might be part of a tag (`</thi` at the end of a
/// delta) or whitespace that might be trimmed is withheld until the next delta decides it.
#[derive(Debug, Clone)]
pub struct ReasoningStream {
    state: State,
    /// Received text not yet emitted.
    pending: String,
}

impl ReasoningStream {
    pub fn new(starts_inside: bool) -> Self {
        let state = if starts_inside {
            State::Inside { at_start: true }
        } else {
            State::Start
        };
        Self {
            state,
            pending: String::new(),
        }
    }

    /// Feeds the next piece of generated text; returns what can be shown so far.
    pub fn push(&mut self, delta: &str) -> Vec<ReasoningDelta> {
        self.pending.push_str(delta);
        super::run_steps(self, false, Self::step)
    }

    /// Ends the reply: emits everything still withheld.
    pub fn finish(&mut self) -> Vec<ReasoningDelta> {
        super::run_steps(self, true, Self::step)
    }

    /// Feeds `pieces` in order and ends the reply: the split of their concatenation.
    fn split_pieces(mut self, pieces: &[&str]) -> ReasoningSplit {
        let mut split = ReasoningSplit::default();
        for piece in pieces {
            split.extend(self.push(piece));
        }
        split.extend(self.finish());
        split
    }

    /// Advances one state; false when it needs more text (or, at the end, has nothing left).
    fn step(&mut self, last: bool, out: &mut Vec<ReasoningDelta>) -> bool {
        match self.state {
            State::Start => {
                let rest = self.pending.trim_start();
                if rest.starts_with(OPEN) {
                    let skip = self.pending.len() - rest.len() + OPEN.len();
                    self.pending.drain(..skip);
                    self.state = State::Inside { at_start: true };
                    true
                } else if !last && OPEN.starts_with(rest) {
                    // Empty, whitespace only, or a prefix of `<think>`: wait.
                    false
                } else {
                    self.state = State::Content;
                    true
                }
            }
            State::Inside { at_start } => {
                if at_start {
                    let trimmed = self.pending.trim_start().len();
                    self.pending.drain(..self.pending.len() - trimmed);
                    if self.pending.is_empty() {
                        return false;
                    }
                    self.state = State::Inside { at_start: false };
                }
                if let Some(end) = self.pending.find(CLOSE) {
                    push_delta(
                        out,
                        ReasoningDelta::Reasoning(self.pending[..end].trim_end().to_owned()),
                    );
                    self.pending.drain(..end + CLOSE.len());
                    self.state = State::AfterClose;
                    return true;
                }
                let ready = if last {
                    // Unclosed at the end: all of it is reasoning, trimmed like a closed block.
                    self.pending.trim_end().len()
                } else {
                    let keep_from = self.pending.len() - partial_marker_len(&self.pending, CLOSE);
                    self.pending[..keep_from].trim_end().len()
                };
                if ready == 0 {
                    if last {
                        self.pending.clear();
                    }
                    return false;
                }
                let text: String = self.pending.drain(..ready).collect();
                if last {
                    self.pending.clear();
                }
                push_delta(out, ReasoningDelta::Reasoning(text));
                true
            }
            State::AfterClose => {
                let trimmed = self.pending.trim_start().len();
                self.pending.drain(..self.pending.len() - trimmed);
                if self.pending.is_empty() {
                    return false;
                }
                self.state = State::Content;
                true
            }
            State::Content => {
                if self.pending.is_empty() {
                    return false;
                }
                let text = std::mem::take(&mut self.pending);
                push_delta(out, ReasoningDelta::Content(text));
                true
            }
        }
    }
}

/// Appends a delta, merging it into the previous one of the same kind and skipping empty ones.
fn push_delta(out: &mut Vec<ReasoningDelta>, delta: ReasoningDelta) {
    match (out.last_mut(), delta) {
        (_, ReasoningDelta::Reasoning(text) | ReasoningDelta::Content(text)) if text.is_empty() => {
        }
        (Some(ReasoningDelta::Reasoning(previous)), ReasoningDelta::Reasoning(text))
        | (Some(ReasoningDelta::Content(previous)), ReasoningDelta::Content(text)) => {
            previous.push_str(&text)
        }
        (_, delta) => out.push(delta),
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `marker`: the part that
/// may still become the marker when more text arrives.
fn partial_marker_len(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && text.ends_with(&marker[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(reasoning: &str, content: &str) -> ReasoningSplit {
        ReasoningSplit {
            reasoning: reasoning.to_owned(),
            content: content.to_owned(),
        }
    }

    fn streamed(pieces: &[&str], starts_inside: bool) -> ReasoningSplit {
        ReasoningStream::new(starts_inside).split_pieces(pieces)
    }

    /// The streamed split equals the whole-text split however the text is cut.
    fn assert_split_invariant(text: &str, starts_inside: bool) {
        let whole = split_reasoning(text, starts_inside);
        let cuts: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for &cut in &cuts {
            let got = streamed(&[&text[..cut], &text[cut..]], starts_inside);
            assert_eq!(got, whole, "text {text:?} cut at {cut}");
        }
        for &a in &cuts {
            for &b in cuts.iter().filter(|&&b| b >= a) {
                let got = streamed(&[&text[..a], &text[a..b], &text[b..]], starts_inside);
                assert_eq!(got, whole, "text {text:?} cut at {a} and {b}");
            }
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(
            streamed(&pieces, starts_inside),
            whole,
            "text {text:?} by chars"
        );
    }

    const SAMPLES: &[&str] = &[
        "<think>\nLet me think.\n</think>\n\nThe answer is 4.",
        "<think>\n\n</think>\n\nHi there",
        "  <think>a < b </thin k</think>  answer </think> more",
        "<think>unclosed reasoning \n",
        "<think",
        "<thin",
        "plain answer <think>not reasoning</think>",
        "   plain with leading spaces",
        "",
        "   ",
        "Okay, so 2+2.\n</think>\n\nIt is 4.",
        "héllo wörld </think> ünïcode ✓",
        "<think>x</think>",
        "</think>",
        "<think></think></think>y",
    ];

    #[test]
    fn qwen3_style_reply_is_split() {
        assert_eq!(
            split_reasoning(
                "<think>\nLet me think.\n</think>\n\nThe answer is 4.",
                false
            ),
            split("Let me think.", "The answer is 4.")
        );
    }

    #[test]
    fn empty_think_block_gives_empty_reasoning() {
        assert_eq!(
            split_reasoning("<think>\n\n</think>\n\nHi there", false),
            split("", "Hi there")
        );
    }

    #[test]
    fn text_started_inside_the_block_without_opening_tag() {
        assert_eq!(
            split_reasoning("Okay, so 2+2.\n</think>\n\nIt is 4.", true),
            split("Okay, so 2+2.", "It is 4.")
        );
    }

    #[test]
    fn without_starts_inside_a_closing_tag_alone_is_content() {
        assert_eq!(
            split_reasoning("Okay.</think>It is 4.", false),
            split("", "Okay.</think>It is 4.")
        );
    }

    #[test]
    fn unclosed_block_is_all_reasoning() {
        assert_eq!(
            split_reasoning("<think>still thinking \n", false),
            split("still thinking", "")
        );
        assert_eq!(
            split_reasoning("still thinking", true),
            split("still thinking", "")
        );
        assert_eq!(
            split_reasoning("<think>a </thi", false),
            split("a </thi", "")
        );
    }

    #[test]
    fn plain_reply_is_unchanged_content() {
        assert_eq!(
            split_reasoning("  Hello <think>x</think>", false),
            split("", "  Hello <think>x</think>")
        );
        assert_eq!(
            split_reasoning("<thinking>", false),
            split("", "<thinking>")
        );
        assert_eq!(split_reasoning("<thi", false), split("", "<thi"));
    }

    #[test]
    fn only_the_first_closing_tag_ends_the_block() {
        assert_eq!(
            split_reasoning("<think>a</think> b </think> c", false),
            split("a", "b </think> c")
        );
    }

    #[test]
    fn partial_closing_tag_is_withheld_until_decided() {
        let mut stream = ReasoningStream::new(true);
        assert_eq!(
            stream.push("thinking </thi"),
            vec![ReasoningDelta::Reasoning("thinking".into())]
        );
        assert_eq!(stream.push("nk>"), vec![]);
        assert_eq!(
            stream.push("\n\nAnswer"),
            vec![ReasoningDelta::Content("Answer".into())]
        );
        assert_eq!(stream.finish(), vec![]);

        let mut stream = ReasoningStream::new(true);
        assert_eq!(
            stream.push("a </thi"),
            vec![ReasoningDelta::Reasoning("a".into())]
        );
        assert_eq!(
            stream.push("s is not a tag"),
            vec![ReasoningDelta::Reasoning(" </this is not a tag".into())]
        );
    }

    #[test]
    fn opening_tag_split_across_deltas() {
        let mut stream = ReasoningStream::new(false);
        assert_eq!(stream.push("<thi"), vec![]);
        assert_eq!(
            stream.push("nk>hm"),
            vec![ReasoningDelta::Reasoning("hm".into())]
        );
        let mut stream = ReasoningStream::new(false);
        assert_eq!(stream.push("<thi"), vec![]);
        assert_eq!(
            stream.push("s"),
            vec![ReasoningDelta::Content("<this".into())]
        );
    }

    #[test]
    fn streamed_split_equals_whole_split_at_every_cut() {
        for text in SAMPLES {
            assert_split_invariant(text, false);
            assert_split_invariant(text, true);
        }
    }

    #[test]
    fn prompt_opening_thinking_is_detected() {
        assert!(prompt_opens_thinking("<｜Assistant｜><think>\n"));
        assert!(prompt_opens_thinking("<|im_start|>assistant\n<think>"));
        assert!(!prompt_opens_thinking(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ));
        assert!(!prompt_opens_thinking("<|im_start|>assistant\n"));
        assert!(!prompt_opens_thinking(
            "<|im_start|>user\n<think><|im_end|>\n<|im_start|>assistant\n"
        ));
    }

    #[test]
    fn thinking_templates_are_recognised() {
        assert!(template_thinks(
            "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}"
        ));
        assert!(!template_thinks(
            "{{ bos_token }}{% for m in messages %}{% endfor %}"
        ));
    }
}
