//! Turning logits into the next token.
//!
//! The order follows llama.cpp's default sampler chain: logit bias, repetition / presence /
//! frequency penalties over the last `repeat_last_n` tokens, top-k, top-p, min-p, then
//! temperature and a draw from the remaining distribution. Temperature 0 is greedy (arg-max
//! after bias and penalties), as in llama.cpp and vLLM.
//!
//! Log-probabilities reported to clients are computed from the raw logits (before bias,
//! penalties and truncation), as llama-server does with `post_sampling_probs: false` and vLLM
//! does by default.

use super::rng::Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1 disables top-p.
    pub top_p: f32,
    /// 0 disables min-p.
    pub min_p: f32,
    /// 1 disables the repetition penalty.
    pub repetition_penalty: f32,
    /// How many of the most recent tokens (prompt and generated) the penalties look at.
    pub repeat_last_n: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Added to the logit of each listed token before anything else.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl SamplingParams {
    /// Greedy decoding with nothing else enabled.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }

    fn has_penalties(&self) -> bool {
        self.repeat_last_n > 0
            && (self.repetition_penalty != 1.0
                || self.presence_penalty != 0.0
                || self.frequency_penalty != 0.0)
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Scratch for candidate (id, logit) pairs, reused across steps.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self {
            params,
            rng,
            candidates: Vec::new(),
        }
    }

    /// Picks the next token. `logits` is modified in place (bias and penalties); `recent` holds
    /// the tokens so far (prompt then generated), of which the last `repeat_last_n` count.
    pub fn sample(&mut self, logits: &mut [f32], recent: &[u32]) -> u32 {
        let p = &self.params;
        for &(id, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        if p.has_penalties() {
            apply_penalties(logits, recent, p);
        }
        if p.temperature <= 0.0 {
            return argmax(logits);
        }

        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (i as u32, l)),
        );
        if c.is_empty() {
            return argmax(logits);
        }
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit_desc);

        // Probabilities at temperature 1 decide the top-p and min-p cut-offs (llama.cpp applies
        // temperature last).
        let max = c[0].1;
        let weights: Vec<f64> = c.iter().map(|&(_, l)| f64::from(l - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut keep = c.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, w) in weights.iter().enumerate() {
                cum += w / total;
                if cum >= f64::from(p.top_p) {
                    keep = keep.min(i + 1);
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            // weights[0] is the most likely token's; keep those at least min_p times as likely.
            let threshold = f64::from(p.min_p) * weights[0];
            let above = weights.iter().take_while(|&&w| w >= threshold).count();
            keep = keep.min(above.max(1));
        }
        c.truncate(keep);

        let inv_t = 1.0 / f64::from(p.temperature);
        let weights: Vec<f64> = c
            .iter()
            .map(|&(_, l)| (f64::from(l - max) * inv_t).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (&(id, _), w) in c.iter().zip(&weights) {
            if r < *w {
                return id;
            }
            r -= w;
        }
        c[c.len() - 1].0
    }
}

fn apply_penalties(logits: &mut [f32], recent: &[u32], p: &SamplingParams) {
    let window = &recent[recent.len().saturating_sub(p.repeat_last_n)..];
    let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    for &t in window {
        *counts.entry(t).or_default() += 1;
    }
    for (&t, &n) in &counts {
        let Some(l) = logits.get_mut(t as usize) else {
            continue;
        };
        if p.repetition_penalty != 1.0 {
            *l = if *l > 0.0 {
                *l / p.repetition_penalty
            } else {
                *l * p.repetition_penalty
            };
        }
        *l -= n as f32 * p.frequency_penalty + p.presence_penalty;
    }
}

/// Index of the largest logit; the lowest index wins ties. NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    // The largest value lane by lane, then the first position that holds it: the scalar rule's
    // answer (NaNs never win, 0 when nothing beats −∞) in two passes the compiler puts in
    // vector registers; over a 128k vocabulary per sequence per step the one-pass scalar loop
    // was a millisecond of the engine thread's serial work at 8 sequences.
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if max == f32::NEG_INFINITY {
        return 0;
    }
    let mut start = 0;
    for chunk in logits.chunks(LANES) {
        if chunk.iter().fold(false, |hit, &x| hit | (x == max)) {
            break;
        }
        start += chunk.len();
    }
    (start + logits[start..].iter().position(|&x| x == max).unwrap_or(0)) as u32
}

/// One token's log-probability and the `n` most likely alternatives, from raw logits.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// (token, logprob), most likely first.
    pub top: Vec<(u32, f32)>,
}

pub fn token_logprobs(logits: &[f32], token: u32, top_n: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_z = max + sum.ln() as f32;
    let logprob = logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&l| l - log_z);
    let mut top: Vec<(u32, f32)> = Vec::new();
    if top_n > 0 {
        let mut all: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        let by_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let n = top_n.min(all.len());
        if n < all.len() {
            all.select_nth_unstable_by(n - 1, by_desc);
            all.truncate(n);
        }
        all.sort_unstable_by(by_desc);
        top = all.into_iter().map(|(i, l)| (i, l - log_z)).collect();
    }
    TokenLogprobs { logprob, top }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..SamplingParams::greedy()
        }
    }

    #[test]
    fn greedy_picks_argmax_and_lowest_index_on_ties() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 2.9], &[]), 1);
        assert_eq!(s.sample(&mut [1.0, 5.0, 5.0], &[]), 1);
        assert_eq!(s.sample(&mut [f32::NAN, 1.0], &[]), 1);
    }

    /// The lane-wise argmax gives the scalar rule's answer (the first position of the largest
    /// value, NaNs passed over, 0 when nothing beats −∞) on vocabulary-sized rows: ties in
    /// other lanes and in the tail, the maximum in the tail, NaNs and −∞ around it.
    #[test]
    fn argmax_is_the_first_largest_value_on_long_rows() {
        fn scalar(logits: &[f32]) -> u32 {
            let (mut best, mut best_v) = (0, f32::NEG_INFINITY);
            for (i, &v) in logits.iter().enumerate() {
                if v > best_v {
                    best_v = v;
                    best = i;
                }
            }
            best as u32
        }
        let mut rng = crate::generation::rng::Rng::new(9);
        let n = 49_157;
        let base: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32 * 10.0 - 5.0).collect();
        let mut cases = vec![base.clone(), vec![f32::NEG_INFINITY; n], vec![f32::NAN; n]];
        for places in [
            &[40_001, 17][..],
            &[17, 40_001],
            &[3, 19, 35],
            &[n - 2, n - 1],
            &[n - 1],
        ] {
            let mut x = base.clone();
            for &p in places {
                x[p] = 7.0;
            }
            cases.push(x);
        }
        let mut x = base.clone();
        x[1000] = f32::NAN;
        x[5] = f32::INFINITY;
        x[4] = f32::NAN;
        cases.push(x);
        let mut x = vec![f32::NEG_INFINITY; n];
        x[0] = f32::NAN;
        x[30_000] = -1e30;
        cases.push(x);
        for (i, x) in cases.iter().enumerate() {
            assert_eq!(argmax(x), scalar(x), "case {i}");
            assert_eq!(
                argmax(&x[..n - 5]),
                scalar(&x[..n - 5]),
                "case {i}, shorter"
            );
        }
    }

    #[test]
    fn logit_bias_can_force_and_ban_tokens() {
        let mut p = params(0.0);
        p.logit_bias = vec![(0, 100.0), (1, -100.0)];
        let mut s = Sampler::new(p);
        assert_eq!(s.sample(&mut [0.0, 10.0, 1.0], &[]), 0);
        let mut p = params(1.0);
        p.logit_bias = vec![(1, f32::NEG_INFINITY)];
        let mut s = Sampler::new(p);
        for _ in 0..200 {
            assert_ne!(s.sample(&mut [1.0, 1.0, 1.0], &[]), 1);
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits = [1.0f32, 1.2, 0.8, 1.1, 0.9];
        let run = |seed| {
            let mut p = params(1.0);
            p.seed = seed;
            let mut s = Sampler::new(p);
            (0..64)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(11), run(11));
        assert_ne!(run(11), run(12));
    }

    #[test]
    fn sampling_follows_the_softmax_distribution() {
        // p = softmax([ln 1, ln 3]) = [0.25, 0.75]
        let mut s = Sampler::new(params(1.0));
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| s.sample(&mut [0.0, 3f32.ln()], &[]) == 1)
            .count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut p = params(1.5);
        p.top_k = 1;
        let mut s = Sampler::new(p);
        for _ in 0..100 {
            assert_eq!(s.sample(&mut [0.5, 0.7, 0.6], &[]), 1);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // probabilities ≈ [0.665, 0.245, 0.090]
        let logits = [2.0f32, 1.0, 0.0];
        let mut p = params(1.0);
        p.top_p = 0.8; // keeps the first two
        let mut s = Sampler::new(p);
        for _ in 0..500 {
            assert_ne!(s.sample(&mut logits.clone(), &[]), 2);
        }
        let mut p = params(1.0);
        p.min_p = 0.3; // 0.245 / 0.665 = 0.37 stays, 0.090 / 0.665 = 0.135 goes
        let mut s = Sampler::new(p);
        let mut seen = [false; 3];
        for _ in 0..2000 {
            seen[s.sample(&mut logits.clone(), &[]) as usize] = true;
        }
        assert_eq!(seen, [true, true, false]);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let mut p = params(0.0);
        p.repetition_penalty = 2.0;
        let mut logits = [4.0f32, -1.0, 3.0];
        apply_penalties(&mut logits, &[0, 1, 0], &p);
        assert_eq!(logits, [2.0, -2.0, 3.0]);
        let mut s = Sampler::new(p);
        assert_eq!(s.sample(&mut [4.0, -1.0, 3.0], &[0]), 2);
    }

    #[test]
    fn presence_and_frequency_penalties_use_counts_within_the_window() {
        let mut p = params(0.0);
        p.presence_penalty = 0.5;
        p.frequency_penalty = 0.25;
        p.repeat_last_n = 3;
        let mut logits = [1.0f32, 1.0, 1.0];
        // window = [1, 1, 2]; token 0 is outside it
        apply_penalties(&mut logits, &[0, 0, 1, 1, 2], &p);
        assert_eq!(logits, [1.0, 1.0 - 0.5 - 0.5, 1.0 - 0.5 - 0.25]);
    }

    #[test]
    fn logprobs_are_log_softmax_of_raw_logits() {
        let logits = [0.0f32, 2f32.ln(), 1f32.ln()];
        let lp = token_logprobs(&logits, 1, 2);
        assert!((lp.logprob - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(lp.top.len(), 2);
        assert_eq!(lp.top[0].0, 1);
        assert!((lp.top[1].1 - 0.25f32.ln()).abs() < 1e-6);
    }
}
