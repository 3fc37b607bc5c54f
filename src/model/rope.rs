//! Rotary position embeddings, computed the way ggml computes them.
//!
//! Reference: RoFormer (Su et al., 2021) for the rotation; ggml's CPU `rope` (ggml-cpu/ops.cpp,
//! `ggml_rope_cache_init` and `rope_yarn`) for the arithmetic. The angle of pair `i` at position
//! `p` is built in f32 as ggml does: `theta = p`, then `theta *= base^(-2/d)` once per pair, each
//! angle divided by its frequency factor and multiplied by the linear scale, then `cosf`/`sinf`.
//! Doing it in f64 would be more exact, but the angles at large positions then differ from
//! llama.cpp's in their last bits, and this small quantized model amplifies such differences
//! (see [`super::attention`]). Every scaling we support is expressed as per-pair frequency
//! factors plus a linear scale, as llama.cpp's GGUF converter expresses Llama 3's.

use candle_core::{Device, Tensor};

use super::config::{ModelConfig, RopeScaling, RopeStyle};

pub struct Rope {
    /// `base^(-2 / rope_dims)`, in f32.
    theta_scale: f32,
    /// Per-pair divisors of the angle (1 unless the model scales its frequencies).
    freq_factors: Vec<f32>,
    /// Multiplies every angle (linear scaling: 1 / factor).
    freq_scale: f32,
    /// Multiplies cos and sin, so the rotated dimensions of queries and keys (ggml's `mscale`,
    /// LongRoPE's attention factor).
    mscale: f32,
    pub style: RopeStyle,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        Self::with_base(cfg, cfg.rope_theta, &cfg.rope_scaling)
    }

    /// The sliding-window layers' rope, where the model gives them their own (Gemma 3).
    pub fn for_swa_layers(cfg: &ModelConfig) -> Option<Self> {
        cfg.swa_rope
            .as_ref()
            .map(|r| Self::with_base(cfg, r.theta, &r.scaling))
    }

    fn with_base(cfg: &ModelConfig, rope_theta: f64, scaling: &RopeScaling) -> Self {
        let half = cfg.rope_dims / 2;
        let d = cfg.rope_dims as f64;
        let mut freq_factors = vec![1f32; half];
        let mut freq_scale = 1f32;
        match scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => freq_scale = (1.0 / factor) as f32,
            RopeScaling::FreqFactors(f) => freq_factors.copy_from_slice(&f[..half]),
            // Resolved by the decoder for its context; unresolved, the original context's.
            RopeScaling::LongRope { short, .. } => freq_factors.copy_from_slice(&short[..half]),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: orig,
            } => {
                let (low_wavelen, high_wavelen) = (orig / low_freq_factor, orig / high_freq_factor);
                for (i, ff) in freq_factors.iter_mut().enumerate() {
                    let freq = 1.0 / rope_theta.powf(2.0 * i as f64 / d);
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    *ff = if wavelen < high_wavelen {
                        1.0
                    } else if wavelen > low_wavelen {
                        *factor as f32
                    } else {
                        let smooth = (orig / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                    };
                }
            }
        }
        Self {
            theta_scale: (rope_theta as f32).powf(-2.0 / cfg.rope_dims as f32),
            freq_factors,
            freq_scale,
            mscale: cfg.rope_attn_factor,
            style: cfg.rope_style,
        }
    }

    /// Rotated pairs per head.
    pub fn half(&self) -> usize {
        self.freq_factors.len()
    }

    /// cos and sin for every position, `positions.len() * half` values each.
    pub fn tables(&self, positions: &[usize], cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        cos.clear();
        sin.clear();
        for &p in positions {
            let mut theta = p as f32;
            for &ff in &self.freq_factors {
                let angle = self.freq_scale * (theta / ff);
                cos.push(angle.cos() * self.mscale);
                sin.push(angle.sin() * self.mscale);
                theta *= self.theta_scale;
            }
        }
    }

    /// The tables as tensors shaped `(rows, 1, half)` for Candle's rope kernels.
    pub fn tensors(
        &self,
        positions: &[usize],
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        self.tables(positions, &mut cos, &mut sin);
        let shape = (positions.len(), 1, self.half());
        Ok((
            Tensor::from_vec(cos, shape, device)?,
            Tensor::from_vec(sin, shape, device)?,
        ))
    }

    /// `x`: `(rows, heads, head_dim)` tensor → rotated, same shape. With partial rotary
    /// embeddings only each head's first `2 * half` dimensions rotate.
    pub fn apply_tensor(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (rows, heads, head_dim) = x.dims3()?;
        let rotated = 2 * self.half();
        let head = if rotated < head_dim {
            x.narrow(2, 0, rotated)?
        } else {
            x.clone()
        };
        // Each row is its own "batch" entry so that it gets its own position's cos/sin.
        let x4 = head.contiguous()?.reshape((rows, heads, 1, rotated))?;
        let y = match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x4, cos, sin)?,
            RopeStyle::HalfSplit => candle_nn::rotary_emb::rope(&x4, cos, sin)?,
        }
        .reshape((rows, heads, rotated))?;
        if rotated < head_dim {
            Tensor::cat(&[&y, &x.narrow(2, rotated, head_dim - rotated)?], 2)
        } else {
            Ok(y)
        }
    }

    /// Rotates every head of one row in place (`cos`/`sin`: that row's `half` values); with
    /// partial rotary embeddings each head's dimensions past `2 * half` are left as they are.
    pub fn rotate_row(&self, row: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
        let half = self.half();
        for head in row.chunks_mut(head_dim) {
            for i in 0..half {
                let (a, b) = match self.style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::HalfSplit => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(scaling: RopeScaling) -> ModelConfig {
        ModelConfig {
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 1,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 64,
            vocab_size: 10,
            rope_scaling: scaling,
            rope_dims: 64,
            rope_original_context: 128,
            max_position_embeddings: 128,
            ..ModelConfig::default()
        }
    }

    #[test]
    fn angles_follow_the_rope_formula() {
        let rope = Rope::new(&cfg(RopeScaling::None));
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        rope.tables(&[0, 7], &mut cos, &mut sin);
        assert!(cos[..32].iter().all(|&c| c == 1.0) && sin[..32].iter().all(|&s| s == 0.0));
        for i in 0..32 {
            let angle = 7.0 * 10_000f64.powf(-((2 * i) as f64) / 64.0);
            assert!(
                (f64::from(cos[32 + i]) - angle.cos()).abs() < 1e-5,
                "pair {i}"
            );
            assert!(
                (f64::from(sin[32 + i]) - angle.sin()).abs() < 1e-5,
                "pair {i}"
            );
        }
    }

    #[test]
    fn linear_scaling_divides_positions_and_factors_divide_frequencies() {
        let (mut c1, mut s1, mut c2, mut s2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        Rope::new(&cfg(RopeScaling::Linear { factor: 4.0 })).tables(&[8], &mut c1, &mut s1);
        Rope::new(&cfg(RopeScaling::None)).tables(&[2], &mut c2, &mut s2);
        for (a, b) in c1.iter().zip(&c2) {
            assert!((a - b).abs() < 1e-5);
        }
        let rope = Rope::new(&cfg(RopeScaling::FreqFactors(vec![2.0; 32])));
        rope.tables(&[6], &mut c1, &mut s1);
        Rope::new(&cfg(RopeScaling::None)).tables(&[3], &mut c2, &mut s2);
        for (a, b) in s1.iter().zip(&s2) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    /// Partial rotary embeddings (Phi-4-mini): the first `rope_dims` of each head rotate, with
    /// angles from a base over `rope_dims`, the rest pass through; the attention factor scales
    /// the rotated part only. Both the row and the tensor forms.
    #[test]
    fn partial_rotary_rotates_the_leading_dimensions_and_scales_them() {
        let mut c = cfg(RopeScaling::None);
        c.num_heads = 2;
        c.rope_dims = 16;
        c.rope_attn_factor = 1.5;
        let rope = Rope::new(&c);
        assert_eq!(rope.half(), 8);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        rope.tables(&[5], &mut cos, &mut sin);
        let angle = 5.0 * 10_000f64.powf(-2.0 / 16.0);
        assert!((f64::from(cos[1]) - 1.5 * angle.cos()).abs() < 1e-5);
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut row = x.clone();
        rope.rotate_row(&mut row, 64, &cos, &sin);
        for head in 0..2 {
            let (a, b) = (head * 64, head * 64 + 8);
            let want_a = x[a] * cos[0] - x[b] * sin[0];
            assert!((row[a] - want_a).abs() < 1e-6);
            assert_eq!(
                row[head * 64 + 16..(head + 1) * 64],
                x[head * 64 + 16..(head + 1) * 64]
            );
        }
        let (ct, st) = rope.tensors(&[5], &Device::Cpu).unwrap();
        let t = Tensor::from_vec(x, (1, 2, 64), &Device::Cpu).unwrap();
        let y = rope.apply_tensor(&t, &ct, &st).unwrap();
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        for (u, v) in y.iter().zip(&row) {
            assert!((u - v).abs() < 1e-5);
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_scales_low_ones() {
        let rope = Rope::new(&cfg(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        }));
        assert_eq!(rope.freq_factors[0], 1.0);
        assert_eq!(rope.freq_factors[31], 8.0);
        assert!(rope.freq_factors.windows(2).all(|w| w[0] <= w[1]));
    }
}
