//! Mixture-of-experts routing, shared by both compute paths: which experts each token goes to
//! and with what weight, computed as llama.cpp's `build_moe_ffn` computes it for the softmax
//! gating families (Mixtral, Qwen2-MoE, Qwen3-MoE): softmax over every expert's router logit,
//! the `used` most probable experts, their probabilities as weights, rescaled to sum to 1 when
//! the family normalizes them.
//!
//! The rows routed to one expert are then multiplied by that expert together ([`Routes`]), so a
//! batch reads each chosen expert's weights once, whatever number of its rows chose it.

/// The rows each expert serves, with their weights.
#[derive(Debug, Default)]
pub struct Routes {
    /// `per_expert[e]`: `(row, weight)` for every row that chose expert `e`, rows ascending.
    pub per_expert: Vec<Vec<(usize, f32)>>,
}

impl Routes {
    /// Routes `rows` rows from their router logits (`rows × experts`, row-major).
    pub fn new(logits: &[f32], experts: usize, used: usize, normalize: bool) -> Self {
        let mut per_expert = vec![Vec::new(); experts];
        let mut probs = vec![0f32; experts];
        let mut chosen = Vec::with_capacity(used);
        for (row, row_logits) in logits.chunks_exact(experts).enumerate() {
            softmax(row_logits, &mut probs);
            top_k(&probs, used, &mut chosen);
            let scale = if normalize {
                let sum: f32 = chosen.iter().map(|&e| probs[e]).sum();
                // As llama.cpp: the sum clamped to f16's smallest normal value.
                1.0 / sum.max(6.103_515_6e-5)
            } else {
                1.0
            };
            for &e in &chosen {
                per_expert[e].push((row, probs[e] * scale));
            }
        }
        Self { per_expert }
    }

    /// The experts with at least one row, with their rows.
    pub fn active(&self) -> impl Iterator<Item = (usize, &[(usize, f32)])> {
        self.per_expert
            .iter()
            .enumerate()
            .filter(|(_, rows)| !rows.is_empty())
            .map(|(e, rows)| (e, rows.as_slice()))
    }
}

/// `out = softmax(x)`, the sum accumulated in f64 as ggml's `soft_max` does.
fn softmax(x: &[f32], out: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f64;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v - max).exp();
        sum += f64::from(*o);
    }
    let inv = (1.0 / sum) as f32;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// The indices of the `k` largest values, largest first (a tie goes to the lower index). A NaN
/// probability (from NaN logits) is never chosen over a number.
fn top_k(values: &[f32], k: usize, out: &mut Vec<usize>) {
    out.clear();
    for _ in 0..k.min(values.len()) {
        let mut best: Option<usize> = None;
        for (i, &v) in values.iter().enumerate() {
            if out.contains(&i) {
                continue;
            }
            let better = match best {
                None => true,
                Some(b) => v > values[b] || (values[b].is_nan() && !v.is_nan()),
            };
            if better {
                best = Some(i);
            }
        }
        out.extend(best);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_most_probable_experts_and_weights_them_by_probability() {
        // Two rows over four experts.
        let logits = [0.0, 2.0, 1.0, -1.0, 3.0, 0.0, 0.0, 2.5];
        let r = Routes::new(&logits, 4, 2, false);
        let p0: Vec<f64> = [0.0f64, 2.0, 1.0, -1.0].iter().map(|v| v.exp()).collect();
        let z0: f64 = p0.iter().sum();
        assert_eq!(r.per_expert[1][0].0, 0);
        assert!((f64::from(r.per_expert[1][0].1) - p0[1] / z0).abs() < 1e-6);
        assert!((f64::from(r.per_expert[2][0].1) - p0[2] / z0).abs() < 1e-6);
        assert_eq!(r.per_expert[0].len(), 1); // row 1's best, not row 0's
        assert_eq!(r.per_expert[3].len(), 1);
        assert_eq!(r.per_expert[0][0].0, 1);
        let active: Vec<usize> = r.active().map(|(e, _)| e).collect();
        assert_eq!(active, vec![0, 1, 2, 3]);
    }

    #[test]
    fn normalized_weights_sum_to_one_per_row() {
        let logits = [0.3, -1.2, 2.2, 0.9, 0.1, -0.4, 1.7, 0.0, 0.5, 0.5, 0.5, 0.5];
        let r = Routes::new(&logits, 4, 3, true);
        let mut sums = [0f32; 3];
        let mut counts = [0usize; 3];
        for rows in &r.per_expert {
            for &(row, w) in rows {
                sums[row] += w;
                counts[row] += 1;
            }
        }
        assert_eq!(counts, [3, 3, 3]);
        for s in sums {
            assert!((s - 1.0).abs() < 1e-6, "{s}");
        }
        // Equal logits: a tie goes to the lower index, so expert 3 is left out of row 2.
        assert!(r.per_expert[3].iter().all(|&(row, _)| row != 2));
    }

    #[test]
    fn nan_logits_never_win_over_numbers() {
        let logits = [f32::NAN, 1.0, 0.0];
        let mut chosen = Vec::new();
        top_k(&logits, 2, &mut chosen);
        assert_eq!(chosen, vec![1, 2]);
    }
}
