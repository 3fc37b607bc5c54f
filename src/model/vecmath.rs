//! Element-wise vector math shared by the CPU forward: SiLU-gated products and exponentials,
//! with the same `e^x` approximation ggml vectorizes (so activations match llama.cpp's).

use half::f16;

use crate::kernels;

/// Whether the AVX2+FMA routines run: the CPU kernels' one selection decides
/// ([`kernels::detect`]), so `LLM_WORKER_CPU_KERNELS=scalar` runs the portable code (libm's
/// `e^x`, not ggml's approximation) here too.
fn avx2_fma() -> bool {
    kernels::detect().runs_avx2_routines()
}

/// `gate = silu(gate) * up`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: AVX2 and FMA are available (checked above).
        unsafe { x86::silu_mul(gate, up) };
        return;
    }
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `gate = gelu(gate) * up` with GELU's tanh approximation, as ggml's CPU computes it
/// (`ggml_vec_geglu_f32` with `GGML_GELU_FP16`): the input rounded to f16 and looked up in a
/// table of f16 results, 0 below -10 and the identity above 10.
pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    let table = gelu_table();
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x * u
        } else {
            table[usize::from(f16::from_f32(x).to_bits())].to_f32() * u
        };
    }
}

/// ggml's `ggml_gelu_f32` of every f16 value, rounded to f16 (`ggml_table_gelu_f16`).
fn gelu_table() -> &'static [f16] {
    static TABLE: std::sync::OnceLock<Vec<f16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        const GELU_COEF_A: f32 = 0.044715;
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        (0..=u16::MAX)
            .map(|bits| {
                let x = f16::from_bits(bits).to_f32();
                let y = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x)).tanh());
                f16::from_f32(y)
            })
            .collect()
    })
}

/// `x = e^(x - shift)` in place; returns the sum of the results.
pub fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: AVX2 and FMA are available (checked above).
        return unsafe { x86::exp_shifted(x, shift) };
    }
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - shift).exp();
        sum += *v;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `e^x` for 8 lanes: the single-precision routine of Arm's optimized-routines library, as
    /// ggml vectorizes it for its SiLU (error ≤ 1.5 ulp; flushes beyond ±88/−104). Using the
    /// same approximation as llama.cpp keeps our activations bit-identical to its.
    /// Reduction `x = n·ln2 + b` with `n` rounded by the 1.5·2²³ shift, a degree-5 polynomial
    /// for `e^b − 1`, and the scale `2^n` assembled in the exponent bits (split in two when `n`
    /// leaves the normal range).
    #[target_feature(enable = "avx2,fma")]
    pub fn expf(x: __m256) -> __m256 {
        let shift = _mm256_set1_ps(f32::from_bits(0x4b40_0000)); // 1.5 * 2^23
        let z = _mm256_fmadd_ps(x, _mm256_set1_ps(f32::from_bits(0x3fb8_aa3b)), shift); // 1/ln2
        let n = _mm256_sub_ps(z, shift);
        let ln2_hi = _mm256_set1_ps(f32::from_bits(0x3f31_7200));
        let ln2_lo = _mm256_set1_ps(f32::from_bits(0x35bf_be8e));
        let b = _mm256_fnmadd_ps(n, ln2_lo, _mm256_fnmadd_ps(n, ln2_hi, x));
        let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
        let k = _mm256_castsi256_ps(_mm256_add_epi32(
            e,
            _mm256_castps_si256(_mm256_set1_ps(1.0)),
        ));
        let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
        let big = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(126.0));
        let u = _mm256_mul_ps(b, b);
        let c5 = _mm256_set1_ps(f32::from_bits(0x3c07_2010));
        let c4 = _mm256_set1_ps(f32::from_bits(0x3d2b_9f17));
        let c3 = _mm256_set1_ps(f32::from_bits(0x3e2a_af33));
        let c2 = _mm256_set1_ps(f32::from_bits(0x3eff_fedb));
        let c1 = _mm256_set1_ps(f32::from_bits(0x3f7f_fff6));
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(_mm256_fmadd_ps(c5, b, c4), u, _mm256_fmadd_ps(c3, b, c2)),
            u,
            _mm256_mul_ps(c1, b),
        );
        if _mm256_movemask_ps(big) == 0 {
            return _mm256_fmadd_ps(j, k, k);
        }
        let g = _mm256_and_si256(
            _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps())),
            _mm256_set1_epi32(0x8200_0000u32 as i32),
        );
        let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
        let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
        let huge = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(192.0));
        _mm256_or_ps(
            _mm256_and_ps(huge, _mm256_mul_ps(s1, s1)),
            _mm256_andnot_ps(
                huge,
                _mm256_or_ps(
                    _mm256_and_ps(big, _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1)),
                    _mm256_andnot_ps(big, _mm256_fmadd_ps(k, j, k)),
                ),
            ),
        )
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        let n = gate.len().min(up.len());
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n for both slices; unaligned loads and stores.
            unsafe {
                let x = _mm256_loadu_ps(gate.as_ptr().add(i));
                let e = expf(_mm256_sub_ps(_mm256_setzero_ps(), x));
                let silu = _mm256_div_ps(x, _mm256_add_ps(one, e));
                let y = _mm256_mul_ps(silu, _mm256_loadu_ps(up.as_ptr().add(i)));
                _mm256_storeu_ps(gate.as_mut_ptr().add(i), y);
            }
            i += 8;
        }
        for j in i..n {
            gate[j] = gate[j] / (1.0 + (-gate[j]).exp()) * up[j];
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
        let n = x.len();
        let sv = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n; unaligned loads and stores.
            unsafe {
                let e = expf(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), sv));
                _mm256_storeu_ps(x.as_mut_ptr().add(i), e);
                acc = _mm256_add_ps(acc, e);
            }
            i += 8;
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        let mut sum: f32 = lanes.iter().sum();
        for v in &mut x[i..] {
            *v = (*v - shift).exp();
            sum += *v;
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm_and_silu_matches_its_definition() {
        let xs: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.043).collect();
        let mut e = xs.clone();
        let sum = exp_shifted(&mut e, 1.5);
        for (x, got) in xs.iter().zip(&e) {
            let want = (x - 1.5).exp();
            let ulp = f32::EPSILON * want.abs().max(f32::MIN_POSITIVE);
            assert!((got - want).abs() <= 2.0 * ulp, "e^{x}: {got} vs {want}");
        }
        let direct: f32 = e.iter().sum();
        assert!((sum - direct).abs() <= 1e-3 * direct);
        let mut gate: Vec<f32> = xs.iter().map(|x| x / 20.0).collect();
        let up: Vec<f32> = xs.iter().map(|x| 1.0 - x / 100.0).collect();
        let want: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        silu_mul(&mut gate, &up);
        for (g, w) in gate.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }
}
