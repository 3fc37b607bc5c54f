//! A plain IQ4_NL / IQ4_XS quantizer for test files, the types Candle cannot quantize. Not
//! llama.cpp's (which searches for the scale with the least error): each 32 weights get the scale
//! that maps their largest magnitude to the level −127, and each weight its nearest level.
//! Layouts as in ggml's `block_iq4_nl` and `block_iq4_xs`.

use llm_worker_rbee::kernels::WeightType;

/// ggml `kvalues_iq4nl`.
const LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// `values` (whole rows of a multiple of the block size) as IQ4_NL or IQ4_XS blocks.
pub fn quantize(ty: WeightType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ty.row_bytes(values.len()));
    match ty {
        WeightType::IQ4NL => {
            for block in values.chunks_exact(32) {
                let d = half::f16::from_f32(level_scale(block));
                out.extend_from_slice(&d.to_le_bytes());
                push_nibbles(&mut out, block, d.to_f32());
            }
        }
        WeightType::IQ4XS => {
            for sb in values.chunks_exact(256) {
                // Each sub-block's scale as a 6-bit multiple (−32..31) of the super-block's d.
                let scales: Vec<f32> = sb.chunks_exact(32).map(level_scale).collect();
                let max = scales.iter().fold(0f32, |m, s| m.max(s.abs()));
                let d = half::f16::from_f32(max / 32.0);
                let ls: Vec<i32> = scales
                    .iter()
                    .map(|&s| {
                        let d = d.to_f32();
                        if d == 0.0 {
                            0
                        } else {
                            (s / d).round().clamp(-32.0, 31.0) as i32
                        }
                    })
                    .collect();
                let scales_h = ls.iter().enumerate().fold(0u16, |h, (ib, &l)| {
                    h | ((((l + 32) >> 4) as u16) << (2 * ib))
                });
                out.extend_from_slice(&d.to_le_bytes());
                out.extend_from_slice(&scales_h.to_le_bytes());
                for pair in ls.chunks_exact(2) {
                    out.push((((pair[0] + 32) & 0xF) | (((pair[1] + 32) & 0xF) << 4)) as u8);
                }
                for (block, &l) in sb.chunks_exact(32).zip(&ls) {
                    push_nibbles(&mut out, block, d.to_f32() * l as f32);
                }
            }
        }
        other => panic!("not an IQ4 type: {other}"),
    }
    out
}

/// The scale that puts the weight of largest magnitude on the level −127.
fn level_scale(block: &[f32]) -> f32 {
    let max = block
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    max / -127.0
}

/// 16 bytes: weight `j`'s nearest level in the low nibble of byte `j`, weight `j + 16`'s in its
/// high nibble.
fn push_nibbles(out: &mut Vec<u8>, block: &[f32], scale: f32) {
    let nearest = |v: f32| -> u8 {
        let target = if scale == 0.0 { 0.0 } else { v / scale };
        (0..16)
            .min_by(|&a, &b| {
                let da = (LEVELS[a] as f32 - target).abs();
                let db = (LEVELS[b] as f32 - target).abs();
                da.total_cmp(&db)
            })
            .expect("16 levels") as u8
    };
    for j in 0..16 {
        out.push(nearest(block[j]) | (nearest(block[j + 16]) << 4));
    }
}
