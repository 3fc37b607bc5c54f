//! Times one quantized matmul at a few activation row counts: what batched decode costs per
//! weight super-block on the kernel path this machine selects (`LLM_WORKER_CPU_KERNELS` forces
//! another). Random weights with sane scales; speed does not depend on the values.
//!
//! ```text
//! cargo run --release --example kernel_bench -- [THREADS] [ROWS,...]
//! ```
//!
//! Prints, per weight type, shape and `m`: milliseconds per call, nanoseconds per 256-weight
//! super-block and thread (the whole call), per super-block, thread and activation row, and
//! GMAC/s.

use llm_worker_rbee::kernels::{ActivationScratch, QMatrix, ThreadPool, WeightType, matmul};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2);
    let ms: Vec<usize> = match args.next() {
        Some(list) => list.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![1, 2, 4, 8, 16],
    };
    let pool = ThreadPool::new(threads);
    let mut scratch = ActivationScratch::default();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    println!(
        "kernel path: {:?}, {threads} threads",
        llm_worker_rbee::kernels::detect()
    );
    for ty in [WeightType::Q4K, WeightType::Q6K] {
        // The Llama-3.2-1B attention, FFN up and FFN down shapes.
        for (rows, cols) in [(2048usize, 2048usize), (8192, 2048), (2048, 8192)] {
            let mut data: Vec<u8> = (0..rows * ty.row_bytes(cols))
                .map(|_| next() as u8)
                .collect();
            let bb = ty.block_bytes();
            for blk in data.chunks_exact_mut(bb) {
                // f16 0.0078125 for d (and Q4_K's dmin): finite, like a real file's.
                let d = if ty == WeightType::Q6K { bb - 2 } else { 0 };
                blk[d..d + 2].copy_from_slice(&[0x00, 0x20]);
                if ty == WeightType::Q4K {
                    blk[2..4].copy_from_slice(&[0x00, 0x20]);
                }
            }
            let w = QMatrix::new(ty, rows, cols, &data)?;
            for &m in &ms {
                let x: Vec<f32> = (0..m * cols)
                    .map(|_| (next() % 1000) as f32 / 500.0 - 1.0)
                    .collect();
                let mut out = vec![0f32; m * rows];
                matmul(&pool, &w, &x, m, &mut out, &mut scratch)?;
                let iters = (200_000_000 / (rows * cols)).max(3);
                let start = Instant::now();
                for _ in 0..iters {
                    matmul(&pool, &w, &x, m, &mut out, &mut scratch)?;
                }
                let call = start.elapsed().as_secs_f64() / iters as f64;
                let per_sb = call * 1e9 * threads as f64 / (rows * cols / 256) as f64;
                println!(
                    "{ty} {rows}x{cols} m={m:2}: {:8.3} ms  {per_sb:6.2} ns/super-block  \
                     {:6.2} ns/super-block/row  {:6.1} GMAC/s",
                    call * 1e3,
                    per_sb / m as f64,
                    (rows * cols * m) as f64 / call / 1e9,
                );
            }
        }
    }
    Ok(())
}
