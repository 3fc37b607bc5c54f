//! Attention on the CPU over an f16 KV cache, with llama.cpp's flash-attention numerics.
//!
//! Reference: ggml's CPU `flash_attn_ext` (ggml-cpu/ops.cpp), which llama-server uses by default
//! on CPU. Its precision is the bar our conformance tests are judged by, so this module follows
//! it rather than computing in full f32:
//! - keys and values are stored as f16 (as llama.cpp's default KV cache type);
//! - for fewer than [`TILED_MIN_ROWS`] query rows, the query is rounded to f16 and the
//!   softmax-weighted sum of values is accumulated in an f16 vector (`ggml_vec_mad_f16`), keys
//!   visited in order with an online softmax;
//! - for larger prompt chunks, the query stays f32 and the accumulation is f32, over key tiles of
//!   [`KEY_TILE`] (ggml's tiled path).
//!
//! Keys a row may not see (the future, or outside a sliding window) are skipped, as ggml skips
//! masked entries.

use half::f16;

/// ggml switches to its tiled f32 path at this many query rows per head.
pub const TILED_MIN_ROWS: usize = 64;
/// Keys per tile in the tiled path.
pub const KEY_TILE: usize = 64;

/// One layer's cache for one sequence: `capacity` positions of `kv_heads * head_dim` values,
/// position-major (`[pos][kv_head][dim]`), as llama.cpp lays out its cache.
#[derive(Debug, Clone, Default)]
pub struct HostKv {
    pub k: Vec<f16>,
    pub v: Vec<f16>,
}

impl HostKv {
    /// Grows to hold `positions` positions of `stride` values each.
    pub fn reserve_positions(&mut self, positions: usize, stride: usize) {
        let n = positions * stride;
        if self.k.len() < n {
            self.k.resize(n, f16::ZERO);
            self.v.resize(n, f16::ZERO);
        }
    }

    /// Stores rows of keys and values (f32, `rows * stride`) from `position` on.
    pub fn write(&mut self, position: usize, stride: usize, k: &[f32], v: &[f32]) {
        let start = position * stride;
        for (dst, &src) in self.k[start..start + k.len()].iter_mut().zip(k) {
            *dst = f16::from_f32(src);
        }
        for (dst, &src) in self.v[start..start + v.len()].iter_mut().zip(v) {
            *dst = f16::from_f32(src);
        }
    }

    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<f16>()
    }
}

/// Shape of an attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Tokens a position can see, itself included; `None` is unlimited.
    pub sliding_window: Option<usize>,
}

impl AttentionShape {
    fn kv_stride(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Key positions visible from `pos`: `[first, pos]`.
    fn first_visible(&self, pos: usize) -> usize {
        match self.sliding_window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        }
    }
}

/// Attention for `rows` consecutive query positions starting at `first_position`, whose keys and
/// values are already in `cache`. `q` is `rows * heads * head_dim` (row-major), `out` likewise.
pub fn attend(
    shape: &AttentionShape,
    cache: &HostKv,
    q: &[f32],
    first_position: usize,
    rows: usize,
    out: &mut [f32],
) {
    let hd = shape.head_dim;
    let group = shape.heads / shape.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let tiled = rows >= TILED_MIN_ROWS;
    let mut scratch = Scratch::new(hd);
    for t in 0..rows {
        let pos = first_position + t;
        for h in 0..shape.heads {
            let kvh = h / group;
            let qo = (t * shape.heads + h) * hd;
            let q_row = &q[qo..qo + hd];
            let o_row = &mut out[qo..qo + hd];
            let keys = shape.first_visible(pos)..pos + 1;
            if tiled {
                attend_row_f32(shape, cache, kvh, q_row, keys, scale, &mut scratch, o_row);
            } else {
                attend_row_f16(shape, cache, kvh, q_row, keys, scale, &mut scratch, o_row);
            }
        }
    }
}

struct Scratch {
    q16: Vec<f32>,
    acc16: Vec<f16>,
    acc32: Vec<f32>,
    scores: Vec<f32>,
}

impl Scratch {
    fn new(hd: usize) -> Self {
        Self {
            q16: vec![0.0; hd],
            acc16: vec![f16::ZERO; hd],
            acc32: vec![0.0; hd],
            scores: Vec::with_capacity(KEY_TILE),
        }
    }
}

fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    a.iter().zip(b).map(|(&x, &y)| x * y.to_f32()).sum()
}

/// ggml's one-row path: f16 query, keys in order, f16 accumulator.
#[allow(clippy::too_many_arguments)]
fn attend_row_f16(
    shape: &AttentionShape,
    cache: &HostKv,
    kvh: usize,
    q_row: &[f32],
    keys: std::ops::Range<usize>,
    scale: f32,
    s: &mut Scratch,
    out: &mut [f32],
) {
    let hd = shape.head_dim;
    let stride = shape.kv_stride();
    for (dst, &x) in s.q16.iter_mut().zip(q_row) {
        *dst = f16::from_f32(x).to_f32();
    }
    s.acc16.iter_mut().for_each(|a| *a = f16::ZERO);
    let mut sum = 0f32;
    let mut max = f32::NEG_INFINITY;
    for c in keys {
        let off = c * stride + kvh * hd;
        let score = dot_f16(&s.q16, &cache.k[off..off + hd]) * scale;
        let mut ms = 1f32;
        let mut vs = 1f32;
        if score > max {
            let old = max;
            max = score;
            ms = (old - max).exp();
            for a in s.acc16.iter_mut() {
                *a = f16::from_f32(a.to_f32() * ms);
            }
        } else {
            vs = (score - max).exp();
        }
        for (a, &v) in s.acc16.iter_mut().zip(&cache.v[off..off + hd]) {
            *a = f16::from_f32(v.to_f32().mul_add(vs, a.to_f32()));
        }
        sum = sum * ms + vs;
    }
    let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
    for (o, a) in out.iter_mut().zip(&s.acc16) {
        *o = a.to_f32() * inv;
    }
}

/// ggml's tiled path: f32 query and accumulator, online softmax per key tile.
#[allow(clippy::too_many_arguments)]
fn attend_row_f32(
    shape: &AttentionShape,
    cache: &HostKv,
    kvh: usize,
    q_row: &[f32],
    keys: std::ops::Range<usize>,
    scale: f32,
    s: &mut Scratch,
    out: &mut [f32],
) {
    let hd = shape.head_dim;
    let stride = shape.kv_stride();
    s.acc32.iter_mut().for_each(|a| *a = 0.0);
    let mut sum = 0f32;
    let mut max = f32::NEG_INFINITY;
    // Tiles are aligned to multiples of KEY_TILE from position 0, as in ggml.
    let first_tile = keys.start / KEY_TILE * KEY_TILE;
    let mut tile_start = first_tile;
    while tile_start < keys.end {
        let tile = tile_start.max(keys.start)..(tile_start + KEY_TILE).min(keys.end);
        s.scores.clear();
        for c in tile.clone() {
            let off = c * stride + kvh * hd;
            s.scores
                .push(dot_f16(q_row, &cache.k[off..off + hd]) * scale);
        }
        let tile_max = s.scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let new_max = max.max(tile_max);
        if new_max > max {
            let ms = (max - new_max).exp();
            s.acc32.iter_mut().for_each(|a| *a *= ms);
            sum *= ms;
        }
        max = new_max;
        for (c, score) in tile.zip(s.scores.iter_mut()) {
            let p = (*score - max).exp();
            sum += p;
            let off = c * stride + kvh * hd;
            for (a, &v) in s.acc32.iter_mut().zip(&cache.v[off..off + hd]) {
                *a = v.to_f32().mul_add(p, *a);
            }
        }
        tile_start += KEY_TILE;
    }
    let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
    for (o, a) in out.iter_mut().zip(&s.acc32) {
        *o = a * inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain f32 attention over f16-rounded keys and values, as the reference.
    fn reference(
        shape: &AttentionShape,
        cache: &HostKv,
        q: &[f32],
        first: usize,
        rows: usize,
    ) -> Vec<f32> {
        let hd = shape.head_dim;
        let group = shape.heads / shape.kv_heads;
        let mut out = vec![0f32; q.len()];
        for t in 0..rows {
            let pos = first + t;
            for h in 0..shape.heads {
                let kvh = h / group;
                let qo = (t * shape.heads + h) * hd;
                let keys: Vec<usize> = (shape.first_visible(pos)..=pos).collect();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&c| {
                        let off = c * shape.kv_stride() + kvh * hd;
                        (0..hd)
                            .map(|d| f64::from(q[qo + d]) * f64::from(cache.k[off + d].to_f32()))
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = w.iter().sum();
                for d in 0..hd {
                    out[qo + d] = keys
                        .iter()
                        .zip(&w)
                        .map(|(&c, &w)| {
                            w * f64::from(cache.v[c * shape.kv_stride() + kvh * hd + d].to_f32())
                        })
                        .sum::<f64>() as f32
                        / z as f32;
                }
            }
        }
        out
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn setup(shape: &AttentionShape, positions: usize, seed: u64) -> HostKv {
        let mut s = seed;
        let stride = shape.kv_stride();
        let mut cache = HostKv::default();
        cache.reserve_positions(positions, stride);
        let k: Vec<f32> = (0..positions * stride).map(|_| lcg(&mut s) * 2.0).collect();
        let v: Vec<f32> = (0..positions * stride).map(|_| lcg(&mut s)).collect();
        cache.write(0, stride, &k, &v);
        cache
    }

    #[test]
    fn both_paths_agree_with_plain_attention_within_f16_precision() {
        let shape = AttentionShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            sliding_window: None,
        };
        for (first, rows) in [(0, 1), (0, 5), (37, 1), (0, 70), (100, 80)] {
            let cache = setup(&shape, first + rows, 9);
            let mut seed = 3;
            let q: Vec<f32> = (0..rows * shape.heads * shape.head_dim)
                .map(|_| lcg(&mut seed))
                .collect();
            let mut out = vec![0f32; q.len()];
            attend(&shape, &cache, &q, first, rows, &mut out);
            let want = reference(&shape, &cache, &q, first, rows);
            let err = out
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // f16 query rounding and an f16 accumulator cost about 3 decimal digits.
            assert!(err < 5e-3, "first {first} rows {rows}: max error {err}");
        }
    }

    #[test]
    fn sliding_window_limits_the_keys() {
        let shape = AttentionShape {
            heads: 2,
            kv_heads: 1,
            head_dim: 8,
            sliding_window: Some(3),
        };
        let cache = setup(&shape, 10, 5);
        let mut seed = 1;
        let q: Vec<f32> = (0..shape.heads * shape.head_dim)
            .map(|_| lcg(&mut seed))
            .collect();
        let mut out = vec![0f32; q.len()];
        attend(&shape, &cache, &q, 9, 1, &mut out);
        // Changing a key outside the window (position 6) changes nothing.
        let mut other = cache.clone();
        for x in &mut other.k[6 * 8..7 * 8] {
            *x = f16::from_f32(5.0);
        }
        let mut out2 = vec![0f32; q.len()];
        attend(&shape, &other, &q, 9, 1, &mut out2);
        assert_eq!(out, out2);
        let want = reference(&shape, &cache, &q, 9, 1);
        let err = out
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 5e-3, "{err}");
    }

    #[test]
    fn a_single_key_returns_its_value() {
        let shape = AttentionShape {
            heads: 1,
            kv_heads: 1,
            head_dim: 4,
            sliding_window: None,
        };
        let mut cache = HostKv::default();
        cache.reserve_positions(1, 4);
        cache.write(0, 4, &[1.0, 2.0, 3.0, 4.0], &[0.5, -1.0, 2.0, 0.25]);
        let mut out = [0f32; 4];
        attend(&shape, &cache, &[0.3, 0.1, -0.2, 0.9], 0, 1, &mut out);
        assert_eq!(out, [0.5, -1.0, 2.0, 0.25]);
    }
}
