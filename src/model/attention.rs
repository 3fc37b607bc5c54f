//! Attention on the CPU over an f16 KV cache, with llama.cpp's numerics.
//!
//! Reference: ggml's CPU `flash_attn_ext` (ggml-cpu/ops.cpp), which llama-server runs by default
//! on the CPU and against whose outputs our conformance is judged. We follow its arithmetic, not
//! just its math, because this small quantized model amplifies last-bit differences: a score
//! that differs in its last bit can flip an 8-bit activation quantization a few layers later.
//! Measured on the default model against llama.cpp's own intermediate tensors, the plain f32
//! formulation left the first layer's attention output 1.6e-4 away (relative) and the
//! emulation below 4e-6.
//! - Keys and values are stored as f16 (llama.cpp's default cache type).
//! - Spans of fewer than [`TILED_MIN_ROWS`] rows (decode steps, short prompts) take ggml's
//!   one-row path: the query is rounded to f16, each key's score is an f16·f16 dot product
//!   summed in ggml's lane order, keys are visited in order with an online softmax, and the
//!   weighted sum of values is accumulated in an f16 vector. The heads that share a key/value
//!   head run together, each in that order, so a cached key or value is read and converted once
//!   for the group, and the keys a few positions ahead are prefetched (a head's slice of a
//!   position is a kilobyte or more from the next one's, which the hardware prefetcher loses).
//! - Longer prompt chunks take ggml's tiled path's precision: f32 query, f32 accumulation.
//!
//! Keys a row may not see (the future, or outside a sliding window) are never visited, as ggml
//! skips masked entries.

use half::f16;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use half::slice::HalfFloatSliceExt;

use super::vecmath::exp_shifted;
use crate::kernels::{self, ThreadPool};

/// Positions per KV block: a multiple of [`KEY_TILE`], so that a key tile of the tiled path lies
/// in one block.
pub(crate) const KV_BLOCK: usize = 64;
const _: () = assert!(KV_BLOCK.is_multiple_of(KEY_TILE));

/// The bytes of the KV blocks alive among the caches that share this counter (one decoder's):
/// a block counts once however many caches hold it.
#[derive(Debug, Clone, Default)]
pub struct KvBytes(Arc<AtomicUsize>);

impl KvBytes {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One block's keys and values: [`KV_BLOCK`] positions of `stride` values each.
#[derive(Debug)]
struct KvBlock {
    k: Vec<f16>,
    v: Vec<f16>,
    live: KvBytes,
}

impl KvBlock {
    fn new(k: Vec<f16>, v: Vec<f16>, live: &KvBytes) -> KvBlock {
        let block = KvBlock {
            k,
            v,
            live: live.clone(),
        };
        live.0.fetch_add(block.bytes(), Ordering::Relaxed);
        block
    }

    fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<f16>()
    }

    fn positions(&self, stride: usize) -> usize {
        self.k.len() / stride
    }

    /// Holds `values` keys and as many values, counting the difference in `live`.
    fn resize(&mut self, values: usize) {
        let before = self.bytes();
        self.k.resize(values, f16::ZERO);
        self.v.resize(values, f16::ZERO);
        self.k.shrink_to_fit();
        self.v.shrink_to_fit();
        // The difference either way: the counter's addition wraps.
        let delta = self.bytes().wrapping_sub(before);
        self.live.0.fetch_add(delta, Ordering::Relaxed);
    }
}

impl Clone for KvBlock {
    /// A block of its own for a cache about to write a shared one.
    fn clone(&self) -> Self {
        KvBlock::new(self.k.clone(), self.v.clone(), &self.live)
    }
}

impl Drop for KvBlock {
    fn drop(&mut self) {
        self.live.0.fetch_sub(self.bytes(), Ordering::Relaxed);
    }
}

/// One layer's cache for one sequence: positions of `kv_heads * head_dim` values, position-major
/// (`[pos][kv_head][dim]`, as llama.cpp lays out its cache), in blocks of [`KV_BLOCK`]
/// positions. Blocks are reference-counted: a cache made from another's prefix
/// ([`HostKv::share_prefix`]) holds the same blocks, and a shared block is copied before it is
/// written, so neither cache ever sees the other's later positions.
#[derive(Debug, Clone, Default)]
pub struct HostKv {
    blocks: Vec<Arc<KvBlock>>,
    stride: usize,
    /// Counts this cache's blocks (and those of every cache sharing the counter).
    live: KvBytes,
}

impl HostKv {
    /// An empty cache whose blocks count in `live`.
    pub fn counted_in(live: &KvBytes) -> HostKv {
        HostKv {
            live: live.clone(),
            ..HostKv::default()
        }
    }

    /// Grows to hold `positions` positions of `stride` values each. Only the last block may hold
    /// fewer than [`KV_BLOCK`] positions, so a cache takes what it was sized for, not whole
    /// blocks.
    pub fn reserve_positions(&mut self, positions: usize, stride: usize) {
        debug_assert!(self.blocks.is_empty() || self.stride == stride);
        self.stride = stride;
        let mut have = self.capacity();
        if let Some(last) = self.blocks.last_mut()
            && have < positions
            && last.positions(stride) < KV_BLOCK
        {
            let grown = (last.positions(stride) + positions - have).min(KV_BLOCK);
            have += grown - last.positions(stride);
            // A shared last block is copied first: the other cache keeps its own.
            Arc::make_mut(last).resize(grown * stride);
        }
        while have < positions {
            let n = (positions - have).min(KV_BLOCK);
            let zeros = vec![f16::ZERO; n * stride];
            let block = KvBlock::new(zeros.clone(), zeros, &self.live);
            self.blocks.push(Arc::new(block));
            have += n;
        }
    }

    /// Positions the blocks hold.
    fn capacity(&self) -> usize {
        self.blocks.last().map_or(0, |last| {
            (self.blocks.len() - 1) * KV_BLOCK + last.positions(self.stride)
        })
    }

    /// Stores rows of keys and values (f32, `rows * stride`, the stride the cache was reserved
    /// with) from `position` on, copying first any block it writes that another cache shares.
    pub fn write(&mut self, position: usize, k: &[f32], v: &[f32]) {
        let stride = self.stride;
        let rows = k.len() / stride;
        let mut r = 0;
        while r < rows {
            let (b, at) = ((position + r) / KV_BLOCK, (position + r) % KV_BLOCK);
            let n = (KV_BLOCK - at).min(rows - r);
            let block = Arc::make_mut(&mut self.blocks[b]);
            let (src, dst) = (r * stride..(r + n) * stride, at * stride..(at + n) * stride);
            block.k[dst.clone()].convert_from_f32_slice(&k[src.clone()]);
            block.v[dst].convert_from_f32_slice(&v[src]);
            r += n;
        }
    }

    /// The keys and values of the block that holds position `c`, and where `c` starts in them.
    #[inline]
    pub fn at(&self, c: usize) -> (&[f16], &[f16], usize) {
        let block = &self.blocks[c / KV_BLOCK];
        (&block.k, &block.v, c % KV_BLOCK * self.stride)
    }

    /// A cache of this one's first `positions` positions, sharing its blocks.
    pub fn share_prefix(&self, positions: usize) -> HostKv {
        let n = positions.div_ceil(KV_BLOCK).min(self.blocks.len());
        HostKv {
            blocks: self.blocks[..n].to_vec(),
            stride: self.stride,
            live: self.live.clone(),
        }
    }

    /// Lets go of the memory past the first `positions` positions (a last block shared with
    /// another cache is left whole rather than copied).
    pub fn truncate(&mut self, positions: usize) {
        self.blocks.truncate(positions.div_ceil(KV_BLOCK));
        self.blocks.shrink_to_fit();
        let stride = self.stride;
        if let Some(block) = self.blocks.last_mut().and_then(Arc::get_mut) {
            let keep = positions - (positions - 1) / KV_BLOCK * KV_BLOCK;
            if block.positions(stride) > keep {
                block.resize(keep * stride);
            }
        }
    }

    /// Bytes of the blocks this cache holds, shared or not.
    pub fn bytes(&self) -> usize {
        self.blocks.iter().map(|b| b.bytes()).sum()
    }

    /// Whether this cache and `other` hold the same block for position `c`.
    #[cfg(test)]
    pub fn shares_block(&self, other: &HostKv, c: usize) -> bool {
        Arc::ptr_eq(&self.blocks[c / KV_BLOCK], &other.blocks[c / KV_BLOCK])
    }
}

/// Shape of an attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Query heads: a multiple of `kv_heads` (grouped-query attention).
    pub heads: usize,
    pub kv_heads: usize,
    /// Dimensions per head, for queries, keys and values alike.
    pub head_dim: usize,
    /// Tokens a position can see, itself included; `None` is unlimited.
    pub sliding_window: Option<usize>,
    /// Multiplies `q·k`; `None`: 1/√head_dim. (Gemma's queries arrive already scaled, with 1.)
    pub score_scale: Option<f32>,
    /// Scores become `cap * tanh(score / cap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
}

impl AttentionShape {
    fn kv_stride(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// What multiplies `q·k`: with a soft cap, divided by the cap, as ggml folds it.
    pub fn scale(&self) -> f32 {
        let scale = self
            .score_scale
            .unwrap_or_else(|| 1.0 / (self.head_dim as f32).sqrt());
        match self.softcap {
            Some(cap) => scale / cap,
            None => scale,
        }
    }

    /// A scaled score after the soft cap (ggml: `cap * tanhf(s)`).
    #[inline]
    fn cap(&self, score: f32) -> f32 {
        match self.softcap {
            Some(cap) => cap * score.tanh(),
            None => score,
        }
    }

    /// Key positions visible from `pos`: `[first, pos]`.
    fn first_visible(&self, pos: usize) -> usize {
        match self.sliding_window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        }
    }
}

/// One span's attention: `rows` consecutive query positions from `first_position`, whose keys
/// and values are already in `cache`; `q` is `rows * heads * head_dim`, row-major.
pub struct SpanAttention<'a> {
    pub cache: &'a HostKv,
    pub q: &'a [f32],
    pub first_position: usize,
    pub rows: usize,
}

/// Where each (row, head) result goes; rows of all spans are concatenated in `out`.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

impl OutPtr {
    /// A method (not the field) so closures capture the whole `Send` wrapper.
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay within the output slice this pointer came from.
        unsafe { self.0.add(offset) }
    }
}
// SAFETY: every (span, row, head) work item writes its own `head_dim` slice of `out`, which
// `attend_spans` borrows mutably for the whole parallel section.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// What one thread does at a time.
enum Item {
    /// One row of a short span for query heads `heads` (consecutive, counted from 0 at the
    /// first query head) sharing one key/value head (ggml's one-row path, each head on its
    /// own; together so that each key and value is converted once for them).
    Group {
        span: usize,
        t: usize,
        heads: std::ops::Range<usize>,
    },
    /// A block of rows of a long span, for all heads sharing one key/value head (tiled path).
    Block {
        span: usize,
        kv_head: usize,
        rows: std::ops::Range<usize>,
    },
}

/// Query rows per tiled block: the key and value tiles converted to f32 are shared by this many
/// rows times the heads of a group.
const QUERY_BLOCK: usize = 16;

/// Attention for several spans at once, spread over `pool`'s threads. `out` holds
/// `Σ rows * heads * head_dim` values, the spans' rows one after another.
pub fn attend_spans(
    shape: &AttentionShape,
    spans: &[SpanAttention<'_>],
    out: &mut [f32],
    pool: Option<&ThreadPool>,
) {
    let hd = shape.head_dim;
    let row_width = shape.heads * hd;
    let mut first_row = Vec::with_capacity(spans.len());
    let mut total_rows = 0;
    for span in spans {
        first_row.push(total_rows);
        total_rows += span.rows;
    }
    assert_eq!(out.len(), total_rows * row_width, "attention output size");
    let group = shape.heads / shape.kv_heads;
    // A group is cut in parts when there are too few of them to keep the threads busy (one
    // decoding sequence of a model with 2 key/value heads).
    let short_rows: usize = spans
        .iter()
        .filter(|s| s.rows < TILED_MIN_ROWS)
        .map(|s| s.rows)
        .sum();
    let parts = pool.map_or(1, |pool| {
        (2 * pool.n_threads())
            .div_ceil((short_rows * shape.kv_heads).max(1))
            .clamp(1, group)
    });
    let mut items = Vec::new();
    for (si, span) in spans.iter().enumerate() {
        if span.rows >= TILED_MIN_ROWS {
            for kv_head in 0..shape.kv_heads {
                for t0 in (0..span.rows).step_by(QUERY_BLOCK) {
                    items.push(Item::Block {
                        span: si,
                        kv_head,
                        rows: t0..(t0 + QUERY_BLOCK).min(span.rows),
                    });
                }
            }
        } else {
            for t in 0..span.rows {
                for kv_head in 0..shape.kv_heads {
                    for p in 0..parts {
                        let first = kv_head * group;
                        items.push(Item::Group {
                            span: si,
                            t,
                            heads: first + group * p / parts..first + group * (p + 1) / parts,
                        });
                    }
                }
            }
        }
    }
    let out_ptr = OutPtr(out.as_mut_ptr());
    let next = AtomicUsize::new(0);
    let work = |_: usize, _: usize| {
        let mut row_scratch = RowScratch::default();
        let mut block_scratch = BlockScratch::default();
        loop {
            let taken = next.fetch_add(1, Ordering::Relaxed);
            if taken >= items.len() {
                break;
            }
            // Last items first: later prompt rows see more keys, so the long ones start early.
            match &items[items.len() - 1 - taken] {
                Item::Group { span, t, heads } => {
                    let sp = &spans[*span];
                    let (lo, hi) = (heads.start * hd, heads.end * hd);
                    let row = first_row[*span] + t;
                    // SAFETY: (row, heads) belongs to this item alone, so this slice (those
                    // heads' outputs, consecutive) is written by no one else; it lies inside
                    // `out`, whose size was checked above.
                    let out_heads = unsafe {
                        std::slice::from_raw_parts_mut(out_ptr.at(row * row_width + lo), hi - lo)
                    };
                    attend_group_like_ggml(
                        shape,
                        sp.cache,
                        heads.start / group,
                        &sp.q[t * row_width + lo..t * row_width + hi],
                        sp.first_position + t,
                        &mut row_scratch,
                        out_heads,
                    );
                }
                Item::Block {
                    span,
                    kv_head,
                    rows,
                } => {
                    let block = QueryBlock {
                        shape,
                        span: &spans[*span],
                        kv_head: *kv_head,
                        rows: rows.clone(),
                        out: out_ptr,
                        out_first_row: first_row[*span],
                    };
                    attend_block(&block, &mut block_scratch);
                }
            }
        }
    };
    match pool {
        // A handful of rows is not worth waking the pool.
        Some(pool) if items.len() >= 2 * pool.n_threads() => pool.run(work),
        _ => work(0, 1),
    }
}

/// Per-thread scratch for [`attend_block`].
#[derive(Default)]
struct BlockScratch {
    /// Key tile, transposed: `[dim][key]`.
    keys: Vec<f32>,
    /// Value tile: `[key][dim]`.
    values: Vec<f32>,
    row: Vec<f32>,
    scores: Vec<f32>,
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    /// Each query's visible keys in the current tile, relative to its start (x86 path).
    vis: Vec<(usize, usize)>,
}

impl BlockScratch {
    /// Sizes the buffers for `nq` queries of `hd` dimensions and resets the running softmax
    /// state (tiles and scores are overwritten before they are read).
    fn prepare(&mut self, hd: usize, nq: usize) {
        self.keys.resize(hd * KEY_TILE, 0.0);
        self.values.resize(KEY_TILE * hd, 0.0);
        self.row.resize(hd, 0.0);
        self.scores.resize(nq * KEY_TILE, 0.0);
        self.acc.clear();
        self.acc.resize(nq * hd, 0.0);
        self.max.clear();
        self.max.resize(nq, f32::NEG_INFINITY);
        self.sum.clear();
        self.sum.resize(nq, 0.0);
        self.vis.clear();
        self.vis.resize(nq, (0, 0));
    }
}

/// One tiled work item: a block of a long span's rows for the heads of one key/value head, and
/// where its output goes. Query `qi` of the block is head `qi % group` of the group at row
/// `rows.start + qi / group`.
struct QueryBlock<'a> {
    shape: &'a AttentionShape,
    span: &'a SpanAttention<'a>,
    kv_head: usize,
    rows: std::ops::Range<usize>,
    out: OutPtr,
    /// The span's first row in `out`.
    out_first_row: usize,
}

impl QueryBlock<'_> {
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.shape.heads / self.shape.kv_heads
    }

    fn queries(&self) -> usize {
        self.rows.len() * self.group()
    }

    /// Query `qi`'s position in the sequence.
    fn position(&self, qi: usize) -> usize {
        self.span.first_position + self.rows.start + qi / self.group()
    }

    /// Where query `qi` starts in the span's `q`.
    fn query_offset(&self, qi: usize) -> usize {
        let group = self.group();
        let (t, j) = (qi / group, qi % group);
        ((self.rows.start + t) * self.shape.heads + self.kv_head * group + j) * self.shape.head_dim
    }

    /// Key and value `c` of this key/value head: the keys and values of the cache block that
    /// holds them, and where they start in it.
    fn kv(&self, c: usize) -> (&[f16], &[f16], usize) {
        let (k, v, at) = self.span.cache.at(c);
        (k, v, at + self.kv_head * self.shape.head_dim)
    }

    /// The key tiles some query of the block sees, aligned at multiples of [`KEY_TILE`]: each
    /// tile's first key and the keys of it that some query sees.
    fn key_tiles(&self) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> + use<> {
        let first_key = self.shape.first_visible(self.position(0));
        let last_key = self.position(self.queries() - 1);
        (first_key / KEY_TILE * KEY_TILE..=last_key)
            .step_by(KEY_TILE)
            .map(move |tile| {
                let keys = tile.max(first_key)..(tile + KEY_TILE).min(last_key + 1);
                (tile, keys)
            })
    }

    /// The keys query `qi` sees among `seen` (a tile's keys that some query sees), relative to
    /// the tile's first key `tile`; `lo >= hi` when it sees none of them.
    fn visible(&self, qi: usize, tile: usize, seen: &std::ops::Range<usize>) -> (usize, usize) {
        let pos = self.position(qi);
        let lo = self.shape.first_visible(pos).max(seen.start) - tile;
        let hi = (pos + 1).min(seen.end).saturating_sub(tile);
        (lo, hi)
    }
}

/// A block of a long span's rows, in f32 with an online softmax over key tiles of
/// [`KEY_TILE`] aligned at multiples of it (ggml's tiled path).
fn attend_block(block: &QueryBlock<'_>, s: &mut BlockScratch) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: AVX2, FMA and F16C are available (checked above).
        unsafe { x86::attend_block(block, s) };
        return;
    }
    attend_block_impl(block, s);
}

/// Keys per tile of the tiled path.
const KEY_TILE: usize = 64;

#[inline(always)]
fn attend_block_impl(block: &QueryBlock<'_>, s: &mut BlockScratch) {
    let (shape, span) = (block.shape, block.span);
    let hd = shape.head_dim;
    let scale = shape.scale();
    let nq = block.queries();
    s.prepare(hd, nq);

    for (tile, seen) in block.key_tiles() {
        for c in seen.clone() {
            let kk = c - tile;
            let (kb, vb, off) = block.kv(c);
            kb[off..off + hd].convert_to_f32_slice(&mut s.row);
            for (d, &v) in s.row.iter().enumerate() {
                s.keys[d * KEY_TILE + kk] = v;
            }
            vb[off..off + hd].convert_to_f32_slice(&mut s.values[kk * hd..(kk + 1) * hd]);
        }
        for qi in 0..nq {
            let (vis_lo, vis_hi) = block.visible(qi, tile, &seen);
            if vis_lo >= vis_hi {
                continue;
            }
            let qo = block.query_offset(qi);
            let q = &span.q[qo..qo + hd];
            let scores = &mut s.scores[..KEY_TILE];
            scores.fill(0.0);
            for (d, &qd) in q.iter().enumerate() {
                let krow = &s.keys[d * KEY_TILE..(d + 1) * KEY_TILE];
                for (sc, &k) in scores.iter_mut().zip(krow) {
                    *sc = qd.mul_add(k, *sc);
                }
            }
            let visible = &mut scores[vis_lo..vis_hi];
            let mut tile_max = f32::NEG_INFINITY;
            for v in visible.iter_mut() {
                *v = shape.cap(*v * scale);
                tile_max = tile_max.max(*v);
            }
            let acc = &mut s.acc[qi * hd..(qi + 1) * hd];
            online_softmax_step(&mut s.max[qi], &mut s.sum[qi], acc, visible, tile_max);
            for (kk, &p) in (vis_lo..vis_hi).zip(visible.iter()) {
                let v = &s.values[kk * hd..(kk + 1) * hd];
                for (a, &x) in acc.iter_mut().zip(v) {
                    *a = p.mul_add(x, *a);
                }
            }
        }
    }
    write_block_output(block, s);
}

/// One query's online-softmax step over a tile: `visible` (its scaled scores) becomes their
/// exponentials, and the running max, sum and accumulator are rescaled when the max grows.
#[inline(always)]
fn online_softmax_step(
    max: &mut f32,
    sum: &mut f32,
    acc: &mut [f32],
    visible: &mut [f32],
    tile_max: f32,
) {
    let new_max = max.max(tile_max);
    if new_max > *max {
        let ms = (*max - new_max).exp();
        acc.iter_mut().for_each(|a| *a *= ms);
        *sum *= ms;
    }
    *max = new_max;
    *sum += exp_shifted(visible, new_max);
}

/// Writes a finished block's rows: each query's accumulator divided by its softmax sum.
#[inline(always)]
fn write_block_output(block: &QueryBlock<'_>, s: &BlockScratch) {
    let shape = block.shape;
    let hd = shape.head_dim;
    let group = block.group();
    for qi in 0..block.queries() {
        let (t, j) = (qi / group, qi % group);
        let head = block.kv_head * group + j;
        let row = block.out_first_row + block.rows.start + t;
        let inv = if s.sum[qi] == 0.0 {
            0.0
        } else {
            1.0 / s.sum[qi]
        };
        // SAFETY: rows of this block for the heads of this key/value head belong to this item
        // alone; the slice lies inside the output checked by `attend_spans`.
        let o = unsafe {
            std::slice::from_raw_parts_mut(block.out.at((row * shape.heads + head) * hd), hd)
        };
        for (o, &a) in o.iter_mut().zip(&s.acc[qi * hd..(qi + 1) * hd]) {
            *o = a * inv;
        }
    }
}

/// ggml switches from its one-row path to its tiled path at this many query rows.
pub const TILED_MIN_ROWS: usize = 64;

/// One query row for query heads sharing key/value head `kv_head` (`q` and `out` hold their
/// `head_dim` values, head after head) with ggml's one-row path, each head on its own:
/// `out = softmax(q·K / sqrt(d)) · V` over the visible keys.
fn attend_group_like_ggml(
    shape: &AttentionShape,
    cache: &HostKv,
    kv_head: usize,
    q: &[f32],
    pos: usize,
    scratch: &mut RowScratch,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: AVX2, FMA and F16C are available (checked above).
        unsafe { x86::attend_group(shape, cache, kv_head, q, pos, scratch, out) };
        return;
    }
    let hd = shape.head_dim;
    for (q, out) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
        attend_row_like_ggml(shape, cache, kv_head, q, pos, scratch, out);
    }
}

/// One query row of one head with ggml's one-row path, in portable code: the query is rounded
/// to f16, each score is [`dot_f16_f16`], keys in order with an online softmax, the values
/// summed into an f16 vector.
fn attend_row_like_ggml(
    shape: &AttentionShape,
    cache: &HostKv,
    kv_head: usize,
    q_row: &[f32],
    pos: usize,
    scratch: &mut RowScratch,
    out: &mut [f32],
) {
    let hd = shape.head_dim;
    let stride = shape.kv_stride();
    let kv_offset = kv_head * hd;
    let scale = shape.scale();
    scratch.q16.clear();
    scratch.q16.extend(q_row.iter().map(|&x| f16::from_f32(x)));
    scratch.acc.clear();
    scratch.acc.resize(hd, f16::ZERO);
    let mut sum = 0f32;
    let mut max = f32::NEG_INFINITY;
    let mut c = shape.first_visible(pos);
    while c <= pos {
        // The keys in order, a cache block at a time.
        let (kb, vb, first) = cache.at(c);
        let end = ((c / KV_BLOCK + 1) * KV_BLOCK).min(pos + 1);
        for i in 0..end - c {
            let off = first + i * stride + kv_offset;
            let score = shape.cap(dot_f16_f16(&kb[off..off + hd], &scratch.q16) * scale);
            let mut ms = 1f32;
            let mut vs = 1f32;
            if score > max {
                let old = max;
                max = score;
                ms = (old - max).exp();
                scale_f16(&mut scratch.acc, ms);
            } else {
                vs = (score - max).exp();
            }
            mad_f16(&mut scratch.acc, &vb[off..off + hd], vs);
            sum = sum * ms + vs;
        }
        c = end;
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, a) in out.iter_mut().zip(&scratch.acc) {
        *o = a.to_f32() * inv;
    }
}

/// Per-thread scratch for the one-row path.
#[derive(Default)]
struct RowScratch {
    q16: Vec<f16>,
    acc: Vec<f16>,
    /// The x86 path's queries (f16-rounded, as f32), one key and one value as f32, and each
    /// head's running max and sum.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

/// Whether the AVX2+FMA+F16C routines run: the CPU kernels' one selection decides
/// ([`kernels::detect`]), so `LLM_WORKER_CPU_KERNELS=scalar` runs attention's portable code too.
/// Both give the same bits.
fn simd_available() -> bool {
    kernels::detect().runs_avx2_routines()
}

/// ggml's `ggml_vec_dot_f16` for f16 keys and an f16 query: four 8-lane f32 accumulators over
/// 32-element steps, reduced pairwise, the tail added in f64.
fn dot_f16_f16(k: &[f16], q: &[f16]) -> f32 {
    let n = k.len().min(q.len());
    let np = n & !31;
    let mut lanes = [[0f32; 8]; 4];
    for i in (0..np).step_by(32) {
        for (j, acc) in lanes.iter_mut().enumerate() {
            for (l, a) in acc.iter_mut().enumerate() {
                let e = i + 8 * j + l;
                *a = k[e].to_f32().mul_add(q[e].to_f32(), *a);
            }
        }
    }
    let mut folded = [0f32; 8];
    for l in 0..8 {
        folded[l] = (lanes[0][l] + lanes[2][l]) + (lanes[1][l] + lanes[3][l]);
    }
    let t0 = [
        folded[0] + folded[4],
        folded[1] + folded[5],
        folded[2] + folded[6],
        folded[3] + folded[7],
    ];
    let mut sum = f64::from((t0[0] + t0[1]) + (t0[2] + t0[3]));
    for e in np..n {
        sum += f64::from(k[e].to_f32() * q[e].to_f32());
    }
    sum as f32
}

/// ggml's `ggml_vec_mad_f16`: `acc = f16(v * p + acc)` lane by lane.
fn mad_f16(acc: &mut [f16], v: &[f16], p: f32) {
    for (a, &x) in acc.iter_mut().zip(v) {
        *a = f16::from_f32(x.to_f32().mul_add(p, a.to_f32()));
    }
}

/// ggml's `ggml_vec_scale_f16`: `acc = f16(acc * s)`.
fn scale_f16(acc: &mut [f16], s: f32) {
    for a in acc.iter_mut() {
        *a = f16::from_f32(a.to_f32() * s);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use half::f16;

    use super::KEY_TILE;

    /// Queries per micro-kernel call: 6 queries × 16 lanes is 12 ymm accumulators, leaving
    /// registers for two loaded vectors and a broadcast.
    const MR: usize = 6;

    /// [`super::attend_block_impl`] with register-tiled micro-kernels: scores for [`MR`] queries
    /// × 16 keys at a time, and `P·V` for [`MR`] queries × 16 dimensions at a time, so that
    /// each loaded key or value vector feeds several FMAs and accumulators stay in registers.
    /// Every score and every accumulator element sees the same operations in the same order as
    /// in the scalar code (dimensions in order for a score, keys in order for an accumulator),
    /// so the results are identical to it.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend_block(block: &super::QueryBlock<'_>, s: &mut super::BlockScratch) {
        let (shape, span) = (block.shape, block.span);
        let hd = shape.head_dim;
        let stride = shape.kv_stride();
        let scale = shape.scale();
        let nq = block.queries();
        assert!(span.q.len() >= span.rows * shape.heads * hd && block.rows.end <= span.rows);
        s.prepare(hd, nq);

        for (tile, seen) in block.key_tiles() {
            let (lo, hi) = (seen.start, seen.end);
            let mut c = lo;
            while c < hi {
                let kk = c - tile;
                // The tile lies in one cache block (KV_BLOCK is a multiple of KEY_TILE).
                let (kb, vb, off) = block.kv(c);
                // Whole groups of 8 keys are transposed 8×8 in registers: scattering one float at
                // a time cost about an eighth of this function.
                let n = if kk.is_multiple_of(8) && c + 8 <= hi {
                    transpose_keys(kb, off, stride, hd, &mut s.keys[kk..]);
                    8
                } else {
                    cvt_f16(&kb[off..off + hd], &mut s.row);
                    for (d, &v) in s.row.iter().enumerate() {
                        s.keys[d * KEY_TILE + kk] = v;
                    }
                    1
                };
                for i in 0..n {
                    let off = off + i * stride;
                    cvt_f16(
                        &vb[off..off + hd],
                        &mut s.values[(kk + i) * hd..(kk + i + 1) * hd],
                    );
                }
                c += n;
            }
            for (qi, vis) in s.vis.iter_mut().enumerate() {
                let (vis_lo, vis_hi) = block.visible(qi, tile, &seen);
                // An empty range is (0, 0): with a sliding window `vis_lo` can lie past the tile.
                *vis = if vis_lo < vis_hi {
                    (vis_lo, vis_hi)
                } else {
                    (0, 0)
                };
            }

            // Scores, for the 16-key chunks any query of the group sees; scores of keys a query
            // does not see come from whatever the tile holds there and are never read.
            let keys = s.keys.as_ptr();
            let scores = s.scores.as_mut_ptr();
            for g0 in (0..nq).step_by(MR) {
                let m = MR.min(nq - g0);
                let vis = s.vis[g0..g0 + m].iter().filter(|v| v.0 < v.1);
                let k0 = vis.clone().map(|v| v.0).min().unwrap_or(0) / 16 * 16;
                let k1 = vis.map(|v| v.1).max().unwrap_or(0).div_ceil(16) * 16;
                let q = span.q.as_ptr();
                // SAFETY: query offsets lie inside `span.q` (asserted above); `keys` holds
                // `hd * KEY_TILE` values and `k1 <= KEY_TILE`; score rows `g0..g0 + m` lie
                // inside `scores` (`nq * KEY_TILE`).
                unsafe {
                    let qp = |i: usize| q.add(block.query_offset(g0 + i.min(m - 1)));
                    let sp = |i: usize| scores.add((g0 + i.min(m - 1)) * KEY_TILE);
                    match m {
                        6 => scores_mr::<6>(qp, sp, keys, hd, k0, k1, scale),
                        5 => scores_mr::<5>(qp, sp, keys, hd, k0, k1, scale),
                        4 => scores_mr::<4>(qp, sp, keys, hd, k0, k1, scale),
                        3 => scores_mr::<3>(qp, sp, keys, hd, k0, k1, scale),
                        2 => scores_mr::<2>(qp, sp, keys, hd, k0, k1, scale),
                        _ => scores_mr::<1>(qp, sp, keys, hd, k0, k1, scale),
                    }
                }
            }

            // Online softmax, exactly as the scalar code.
            for qi in 0..nq {
                let (vis_lo, vis_hi) = s.vis[qi];
                if vis_lo >= vis_hi {
                    continue;
                }
                let visible = &mut s.scores[qi * KEY_TILE + vis_lo..qi * KEY_TILE + vis_hi];
                if shape.softcap.is_some() {
                    for v in visible.iter_mut() {
                        *v = shape.cap(*v);
                    }
                }
                let tile_max = visible.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let acc = &mut s.acc[qi * hd..(qi + 1) * hd];
                super::online_softmax_step(&mut s.max[qi], &mut s.sum[qi], acc, visible, tile_max);
            }

            // P·V: keys all queries of a group see go through the register-tiled kernel; a
            // query's keys before and after those go one query at a time, so that every
            // accumulator still takes its keys in order.
            let values = s.values.as_ptr();
            let acc = s.acc.as_mut_ptr();
            let scores = s.scores.as_ptr();
            for g0 in (0..nq).step_by(MR) {
                let m = MR.min(nq - g0);
                let vis = &s.vis[g0..g0 + m];
                let common_lo = vis.iter().map(|v| v.0).max().unwrap_or(0);
                let common_hi = vis.iter().map(|v| v.1).min().unwrap_or(0).max(common_lo);
                // SAFETY: score rows and accumulator rows `g0..g0 + m` lie inside `scores`
                // (`nq * KEY_TILE`) and `acc` (`nq * hd`); key ranges are within `KEY_TILE`,
                // the rows of `values`.
                unsafe {
                    let one = |i: usize, keys: Range<usize>| {
                        pv_mr::<1>(
                            |_| scores.add((g0 + i) * KEY_TILE),
                            |_| acc.add((g0 + i) * hd),
                            values,
                            hd,
                            keys,
                        )
                    };
                    if common_lo >= common_hi {
                        for (i, &(vis_lo, vis_hi)) in vis.iter().enumerate() {
                            one(i, vis_lo..vis_hi);
                        }
                        continue;
                    }
                    for (i, &(vis_lo, _)) in vis.iter().enumerate() {
                        one(i, vis_lo..common_lo);
                    }
                    let pp = |i: usize| scores.add((g0 + i.min(m - 1)) * KEY_TILE);
                    let ap = |i: usize| acc.add((g0 + i.min(m - 1)) * hd);
                    let keys = common_lo..common_hi;
                    match m {
                        6 => pv_mr::<6>(pp, ap, values, hd, keys),
                        5 => pv_mr::<5>(pp, ap, values, hd, keys),
                        4 => pv_mr::<4>(pp, ap, values, hd, keys),
                        3 => pv_mr::<3>(pp, ap, values, hd, keys),
                        2 => pv_mr::<2>(pp, ap, values, hd, keys),
                        _ => pv_mr::<1>(pp, ap, values, hd, keys),
                    }
                    for (i, &(_, vis_hi)) in vis.iter().enumerate() {
                        one(i, common_hi..vis_hi);
                    }
                }
            }
        }
        super::write_block_output(block, s);
    }

    /// Keys `k[off + i * stride..][..hd]` for `i < 8`, converted to f32 and stored transposed:
    /// dimension `d` of key `i` at `keys[d * KEY_TILE + i]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn transpose_keys(k: &[f16], off: usize, stride: usize, hd: usize, keys: &mut [f32]) {
        let rows: [&[f16]; 8] = std::array::from_fn(|i| &k[off + i * stride..][..hd]);
        let mut d = 0;
        while d + 8 <= hd {
            // SAFETY: d + 8 <= hd, inside each key row.
            let r: [__m256; 8] = std::array::from_fn(|i| unsafe {
                _mm256_cvtph_ps(_mm_loadu_si128(rows[i].as_ptr().add(d).cast()))
            });
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xee>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xee>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xee>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xee>(t5, t7);
            let cols = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (j, col) in cols.into_iter().enumerate() {
                let dst = &mut keys[(d + j) * KEY_TILE..][..8];
                // SAFETY: `dst` holds 8 floats; unaligned store.
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), col) };
            }
            d += 8;
        }
        for d in d..hd {
            for (i, row) in rows.iter().enumerate() {
                keys[d * KEY_TILE + i] = row[d].to_f32();
            }
        }
    }

    /// f16 to f32, 8 lanes at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn cvt_f16(src: &[f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n for both slices; unaligned loads and stores.
            unsafe {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().add(i).cast()));
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), x);
            }
            i += 8;
        }
        for j in i..n {
            dst[j] = src[j].to_f32();
        }
    }

    /// `scores_i[k] = (Σ_d q_i[d]·key_k[d]) * scale` for `R` queries and keys `k0..k1` (a
    /// range of 16-key chunks) of the transposed tile `keys` (`[dim][KEY_TILE]`), with the
    /// dimensions summed in order by FMAs from zero.
    ///
    /// # Safety
    /// `q(i)` must point at `hd` readable values and `scores(i)` at `KEY_TILE` writable ones
    /// for `i < R`; `keys` at `hd * KEY_TILE` values; `k1 <= KEY_TILE`. AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn scores_mr<const R: usize>(
        q: impl Fn(usize) -> *const f32,
        scores: impl Fn(usize) -> *mut f32,
        keys: *const f32,
        hd: usize,
        k0: usize,
        k1: usize,
        scale: f32,
    ) {
        let qs: [*const f32; R] = std::array::from_fn(&q);
        let sv = _mm256_set1_ps(scale);
        let mut k = k0;
        while k < k1 {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            // SAFETY: d < hd and k + 16 <= KEY_TILE, inside `keys`; d < hd inside each query
            // (the caller's contract).
            unsafe { fma_rows16(&mut acc, &qs, keys.add(k), KEY_TILE, 0..hd) };
            for (i, a) in acc.iter().enumerate() {
                // SAFETY: k + 16 <= KEY_TILE, inside each score row.
                unsafe {
                    let sp = scores(i).add(k);
                    _mm256_storeu_ps(sp, _mm256_mul_ps(a[0], sv));
                    _mm256_storeu_ps(sp.add(8), _mm256_mul_ps(a[1], sv));
                }
            }
            k += 16;
        }
    }

    /// `acc_i += Σ_k p_i[k]·value_k` for `R` queries over the range `keys` of the value tile
    /// (`[key][hd]`), keys taken in order for every element; 16 dimensions at a time, then 8,
    /// then one.
    ///
    /// # Safety
    /// `p(i)` must point at `KEY_TILE` readable values and `acc(i)` at `hd` writable ones for
    /// `i < R`, and `values` at `KEY_TILE * hd`; `keys.end <= KEY_TILE`. AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pv_mr<const R: usize>(
        p: impl Fn(usize) -> *const f32,
        acc: impl Fn(usize) -> *mut f32,
        values: *const f32,
        hd: usize,
        keys: Range<usize>,
    ) {
        if keys.is_empty() {
            return;
        }
        let ps: [*const f32; R] = std::array::from_fn(&p);
        let accs: [*mut f32; R] = std::array::from_fn(&acc);
        let mut d = 0;
        while d + 16 <= hd {
            // SAFETY: d + 16 <= hd, inside each accumulator row.
            let mut a: [[__m256; 2]; R] = std::array::from_fn(|i| unsafe {
                [
                    _mm256_loadu_ps(accs[i].add(d)),
                    _mm256_loadu_ps(accs[i].add(d + 8)),
                ]
            });
            // SAFETY: keys lie below KEY_TILE and d + 16 <= hd: inside `values` and each
            // probability row.
            unsafe { fma_rows16(&mut a, &ps, values.add(d), hd, keys.clone()) };
            for (a, &ap) in a.iter().zip(&accs) {
                // SAFETY: as for the loads above.
                unsafe {
                    _mm256_storeu_ps(ap.add(d), a[0]);
                    _mm256_storeu_ps(ap.add(d + 8), a[1]);
                }
            }
            d += 16;
        }
        if d + 8 <= hd {
            // SAFETY: d + 8 <= hd, inside each accumulator row.
            let mut a: [__m256; R] =
                std::array::from_fn(|i| unsafe { _mm256_loadu_ps(accs[i].add(d)) });
            for k in keys.clone() {
                // SAFETY: k < KEY_TILE and d + 8 <= hd, as above.
                unsafe {
                    let va = _mm256_loadu_ps(values.add(k * hd + d));
                    for (a, &pp) in a.iter_mut().zip(&ps) {
                        *a = _mm256_fmadd_ps(_mm256_broadcast_ss(&*pp.add(k)), va, *a);
                    }
                }
            }
            for (a, &ap) in a.iter().zip(&accs) {
                // SAFETY: as for the loads above.
                unsafe { _mm256_storeu_ps(ap.add(d), *a) };
            }
            d += 8;
        }
        for d in d..hd {
            for (&pp, &ap) in ps.iter().zip(&accs) {
                // SAFETY: d < hd and k < KEY_TILE, as above.
                unsafe {
                    let mut a = *ap.add(d);
                    for k in keys.clone() {
                        a = (*pp.add(k)).mul_add(*values.add(k * hd + d), a);
                    }
                    *ap.add(d) = a;
                }
            }
        }
    }

    /// `acc_i += Σ_{j ∈ js} x_i[j]·t[j·stride..][..16]` for the `R` rows `x_i`, `j` in order by
    /// FMAs: the register tile that both micro-kernels run (over a score's dimensions, over an
    /// accumulator's keys).
    ///
    /// # Safety
    /// For every `j` in `js`, `x[i].add(j)` must be readable for `i < R` and `t.add(j * stride)`
    /// must point at 16 readable values. AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn fma_rows16<const R: usize>(
        acc: &mut [[__m256; 2]; R],
        x: &[*const f32; R],
        t: *const f32,
        stride: usize,
        js: Range<usize>,
    ) {
        for j in js {
            // SAFETY: the caller's contract.
            unsafe {
                let tp = t.add(j * stride);
                let ta = _mm256_loadu_ps(tp);
                let tb = _mm256_loadu_ps(tp.add(8));
                for (a, &xp) in acc.iter_mut().zip(x) {
                    let xv = _mm256_broadcast_ss(&*xp.add(j));
                    a[0] = _mm256_fmadd_ps(xv, ta, a[0]);
                    a[1] = _mm256_fmadd_ps(xv, tb, a[1]);
                }
            }
        }
    }

    /// [`super::attend_group_like_ggml`]: ggml's one-row path for each head of the group, with
    /// each key and value converted to f32 once for all of them. Every head sees the operations
    /// of [`super::attend_row_like_ggml`] in its order (f16 query and key values are exact in
    /// f32; the dot product's lanes and reduction are `ggml_vec_dot_f16`'s), so the results are
    /// identical to it.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend_group(
        shape: &super::AttentionShape,
        cache: &super::HostKv,
        kv_head: usize,
        q: &[f32],
        pos: usize,
        s: &mut super::RowScratch,
        out: &mut [f32],
    ) {
        let hd = shape.head_dim;
        let heads = q.len() / hd;
        let stride = shape.kv_stride();
        let kv_offset = kv_head * hd;
        let scale = shape.scale();
        s.q.clear();
        s.q.extend(q.iter().map(|&x| f16::from_f32(x).to_f32()));
        s.acc.clear();
        s.acc.resize(heads * hd, f16::ZERO);
        s.k.resize(hd, 0.0);
        s.v.resize(hd, 0.0);
        s.max.clear();
        s.max.resize(heads, f32::NEG_INFINITY);
        s.sum.clear();
        s.sum.resize(heads, 0.0);
        let mut c = shape.first_visible(pos);
        while c <= pos {
            let (kb, vb, first) = cache.at(c);
            let end = ((c / super::KV_BLOCK + 1) * super::KV_BLOCK).min(pos + 1);
            for i in 0..end - c {
                if c + i + PREFETCH_KEYS <= pos {
                    let (kn, vn, at) = cache.at(c + i + PREFETCH_KEYS);
                    prefetch_row(&kn[at + kv_offset..at + kv_offset + hd]);
                    prefetch_row(&vn[at + kv_offset..at + kv_offset + hd]);
                }
                let off = first + i * stride + kv_offset;
                cvt_f16(&kb[off..off + hd], &mut s.k);
                cvt_f16(&vb[off..off + hd], &mut s.v);
                for j in 0..heads {
                    let score = shape.cap(dot_ggml(&s.k, &s.q[j * hd..(j + 1) * hd]) * scale);
                    let acc = &mut s.acc[j * hd..(j + 1) * hd];
                    let (max, sum) = (&mut s.max[j], &mut s.sum[j]);
                    let mut ms = 1f32;
                    let mut vs = 1f32;
                    if score > *max {
                        ms = (*max - score).exp();
                        *max = score;
                        scale_f16(acc, ms);
                    } else {
                        vs = (score - *max).exp();
                    }
                    mad_f16(acc, &s.v, vs);
                    *sum = *sum * ms + vs;
                }
            }
            c = end;
        }
        for j in 0..heads {
            let inv = if s.sum[j] == 0.0 { 0.0 } else { 1.0 / s.sum[j] };
            let acc = &s.acc[j * hd..(j + 1) * hd];
            for (o, a) in out[j * hd..(j + 1) * hd].iter_mut().zip(acc) {
                *o = a.to_f32() * inv;
            }
        }
    }

    /// How many keys ahead the one-row path asks for keys and values: a head's slice of a
    /// cache position is a few lines a kilobyte or more from the next position's, a stride the
    /// hardware prefetcher loses at page ends, and each key's work is too long for the core to
    /// run ahead to the next key's loads by itself.
    const PREFETCH_KEYS: usize = 16;

    /// Asks for the cache lines of `row` (into all cache levels).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn prefetch_row(row: &[f16]) {
        let bytes = std::mem::size_of_val(row);
        for line in (0..bytes).step_by(64) {
            // SAFETY: the address lies inside `row`; a prefetch reads nothing architecturally.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().cast::<i8>().add(line)) };
        }
    }

    /// `ggml_vec_dot_f16` on values already in f32: four 8-lane accumulators over 32-element
    /// steps, reduced as `GGML_F32x8_REDUCE`, the tail added in f64.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn dot_ggml(k: &[f32], q: &[f32]) -> f32 {
        let n = k.len().min(q.len());
        let np = n & !31;
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < np {
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: i + 8j + 8 <= np <= n for both slices; unaligned loads.
                unsafe {
                    let x = _mm256_loadu_ps(k.as_ptr().add(i + 8 * j));
                    let y = _mm256_loadu_ps(q.as_ptr().add(i + 8 * j));
                    *a = _mm256_fmadd_ps(x, y, *a);
                }
            }
            i += 32;
        }
        // 0+=2, 1+=3, 0+=1, then the two halves and two horizontal adds.
        let s02 = _mm256_add_ps(acc[0], acc[2]);
        let s13 = _mm256_add_ps(acc[1], acc[3]);
        let s = _mm256_add_ps(s02, s13);
        let t0 = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let t1 = _mm_hadd_ps(t0, t0);
        let mut sum = f64::from(_mm_cvtss_f32(_mm_hadd_ps(t1, t1)));
        for e in np..n {
            sum += f64::from(k[e] * q[e]);
        }
        sum as f32
    }

    /// `ggml_vec_mad_f16`: `acc = f16(v * p + acc)` lane by lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn mad_f16(acc: &mut [f16], v: &[f32], p: f32) {
        let n = acc.len().min(v.len());
        let pv = _mm256_set1_ps(p);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n for both slices; unaligned loads and stores.
            unsafe {
                let x = _mm256_loadu_ps(v.as_ptr().add(i));
                let y = _mm256_cvtph_ps(_mm_loadu_si128(acc.as_ptr().add(i).cast()));
                let r = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_fmadd_ps(x, pv, y));
                _mm_storeu_si128(acc.as_mut_ptr().add(i).cast(), r);
            }
            i += 8;
        }
        for j in i..n {
            acc[j] = f16::from_f32(v[j].mul_add(p, acc[j].to_f32()));
        }
    }

    /// `ggml_vec_scale_f16`: `acc = f16(acc * s)`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn scale_f16(acc: &mut [f16], s: f32) {
        let n = acc.len();
        let sv = _mm256_set1_ps(s);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n; unaligned loads and stores.
            unsafe {
                let y = _mm256_cvtph_ps(_mm_loadu_si128(acc.as_ptr().add(i).cast()));
                let r = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(y, sv));
                _mm_storeu_si128(acc.as_mut_ptr().add(i).cast(), r);
            }
            i += 8;
        }
        for a in &mut acc[i..] {
            *a = f16::from_f32(a.to_f32() * s);
        }
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
                        let (k, _, at) = cache.at(c);
                        let off = at + kvh * hd;
                        (0..hd)
                            .map(|d| f64::from(q[qo + d]) * f64::from(k[off + d].to_f32()))
                            .sum::<f64>()
                    })
                    .map(|dot| {
                        let scale =
                            f64::from(shape.score_scale.unwrap_or(1.0 / (hd as f32).sqrt()));
                        match shape.softcap.map(f64::from) {
                            Some(cap) => cap * (dot * scale / cap).tanh(),
                            None => dot * scale,
                        }
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
                            let (_, v, at) = cache.at(c);
                            w * f64::from(v[at + kvh * hd + d].to_f32())
                        })
                        .sum::<f64>() as f32
                        / z as f32;
                }
            }
        }
        out
    }

    /// A shape of the x86-against-scalar tests; head dim 40 takes Gemma 2's soft cap.
    fn test_shape(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        sliding_window: Option<usize>,
    ) -> AttentionShape {
        AttentionShape {
            heads,
            kv_heads,
            head_dim,
            sliding_window,
            score_scale: None,
            softcap: (head_dim == 40).then_some(0.7),
        }
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
        cache.write(0, &k, &v);
        cache
    }

    fn attend(
        shape: &AttentionShape,
        cache: &HostKv,
        q: &[f32],
        first: usize,
        rows: usize,
        out: &mut [f32],
    ) {
        let span = SpanAttention {
            cache,
            q,
            first_position: first,
            rows,
        };
        attend_spans(shape, &[span], out, None);
    }

    /// The x86 one-row path converts each key and value once for a group of heads and keeps
    /// ggml's order for every head, so it agrees exactly with the portable rows, on shapes with
    /// every tail (head dims not a multiple of 32 or 8), groups of 1 to 8, a soft cap, sliding
    /// windows and positions across cache blocks.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x86_group_rows_match_the_scalar_ones() {
        if !kernels::KernelPath::Avx2.runs_avx2_routines() {
            return;
        }
        let cases = [
            // heads, kv_heads, head_dim, window, position
            (32, 8, 64, None, 150),
            (8, 8, 40, Some(50), 70),
            (6, 2, 20, None, 0),
            (8, 1, 128, Some(64), 200),
            (12, 2, 72, None, 63),
            (3, 1, 64, Some(1), 90),
        ];
        for (heads, kv_heads, head_dim, sliding_window, pos) in cases {
            let shape = test_shape(heads, kv_heads, head_dim, sliding_window);
            let cache = setup(&shape, pos + 1, 13);
            let mut seed = 3;
            let q: Vec<f32> = (0..heads * head_dim)
                .map(|_| lcg(&mut seed) * 1.5)
                .collect();
            let width = heads / kv_heads * head_dim;
            let mut want = vec![f32::NAN; q.len()];
            let mut got = vec![f32::NAN; q.len()];
            let mut scratch = RowScratch::default();
            for kv_head in 0..kv_heads {
                let group = kv_head * width..(kv_head + 1) * width;
                for (qh, oh) in q[group.clone()]
                    .chunks_exact(head_dim)
                    .zip(want[group.clone()].chunks_exact_mut(head_dim))
                {
                    attend_row_like_ggml(&shape, &cache, kv_head, qh, pos, &mut scratch, oh);
                }
                // SAFETY: AVX2, FMA and F16C are available (checked above).
                unsafe {
                    x86::attend_group(
                        &shape,
                        &cache,
                        kv_head,
                        &q[group.clone()],
                        pos,
                        &mut scratch,
                        &mut got[group],
                    )
                };
            }
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    a.is_finite() && a.to_bits() == b.to_bits(),
                    "heads {heads}/{kv_heads} dim {head_dim} window {sliding_window:?} position \
                     {pos}: element {i}: {a} vs {b}"
                );
            }
        }
    }

    /// With few key/value heads and one decoding row, the groups are cut into parts for the
    /// threads; the parts give the same bits as whole groups on one thread.
    #[test]
    fn groups_cut_for_the_threads_give_the_same_rows() {
        let shape = test_shape(12, 2, 64, None);
        let cache = setup(&shape, 101, 21);
        let other = setup(&shape, 40, 22);
        let mut seed = 5;
        let q: Vec<f32> = (0..2 * 12 * 64).map(|_| lcg(&mut seed)).collect();
        let spans = || {
            [
                SpanAttention {
                    cache: &cache,
                    q: &q[..768],
                    first_position: 100,
                    rows: 1,
                },
                SpanAttention {
                    cache: &other,
                    q: &q[768..],
                    first_position: 39,
                    rows: 1,
                },
            ]
        };
        let mut alone = vec![f32::NAN; q.len()];
        attend_spans(&shape, &spans()[..1], &mut alone[..768], None);
        attend_spans(&shape, &spans()[1..], &mut alone[768..], None);
        for threads in [2, 3, 5] {
            let pool = ThreadPool::new(threads);
            let mut cut = vec![f32::NAN; q.len()];
            attend_spans(&shape, &spans()[..1], &mut cut[..768], Some(&pool));
            attend_spans(&shape, &spans()[1..], &mut cut[768..], Some(&pool));
            let mut both = vec![f32::NAN; q.len()];
            attend_spans(&shape, &spans(), &mut both, Some(&pool));
            for (i, ((a, b), c)) in alone.iter().zip(&cut).zip(&both).enumerate() {
                assert!(
                    a.is_finite() && a.to_bits() == b.to_bits() && a.to_bits() == c.to_bits(),
                    "threads {threads}: element {i}: {a} {b} {c}"
                );
            }
        }
    }

    #[test]
    fn agrees_with_plain_f64_attention_over_the_same_cache() {
        let plain = AttentionShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            sliding_window: None,
            score_scale: None,
            softcap: None,
        };
        // Gemma 2's: queries scaled before (score scale 1) and scores soft-capped.
        let capped = AttentionShape {
            score_scale: Some(0.9),
            softcap: Some(0.5),
            ..plain
        };
        let cases = [(0, 1), (0, 5), (37, 1), (0, 70), (100, 80)];
        for (shape, (first, rows)) in cases
            .iter()
            .map(|&c| (plain, c))
            .chain(cases.iter().map(|&c| (capped, c)))
        {
            let shape = &shape;
            let cache = setup(shape, first + rows, 9);
            let mut seed = 3;
            let q: Vec<f32> = (0..rows * shape.heads * shape.head_dim)
                .map(|_| lcg(&mut seed))
                .collect();
            let mut out = vec![0f32; q.len()];
            attend(shape, &cache, &q, first, rows, &mut out);
            let want = reference(shape, &cache, &q, first, rows);
            // The pool splits the same work across threads: identical results.
            let pool = ThreadPool::new(3);
            let mut pooled = vec![0f32; q.len()];
            let span = SpanAttention {
                cache: &cache,
                q: &q,
                first_position: first,
                rows,
            };
            attend_spans(shape, &[span], &mut pooled, Some(&pool));
            assert_eq!(out, pooled);
            let err = out
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // Tiled spans compute in f32 over the same f16 cache (only summation order differs);
            // short spans round the query and the accumulator to f16 as ggml does (values here
            // are below 1, where an f16 step is at most 2^-11).
            let tolerance = if rows >= TILED_MIN_ROWS { 1e-5 } else { 2e-3 };
            assert!(
                err < tolerance,
                "first {first} rows {rows}: max error {err}"
            );
        }
    }

    /// The x86 micro-kernels do each score's and each accumulator's operations in the scalar
    /// code's order, so the two agree exactly, on shapes that exercise every remainder: blocks
    /// of rows that are not a multiple of the micro-kernel's queries, head dims with 16-, 8- and
    /// 1-wide tails, GQA groups of 1 and 3, sliding windows, spans starting mid-cache.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x86_tiled_block_matches_the_scalar_one() {
        if !kernels::KernelPath::Avx2.runs_avx2_routines() {
            return;
        }
        let cases = [
            // heads, kv_heads, head_dim, window, first_position, rows
            (3, 1, 64, None, 0, 93),
            (3, 3, 40, Some(50), 37, 70),
            (6, 2, 24, Some(100), 130, 81),
            (2, 2, 8, None, 64, 65),
            (3, 1, 20, Some(7), 5, 77),
            (9, 3, 64, Some(64), 190, 64),
        ];
        for (heads, kv_heads, head_dim, sliding_window, first, rows) in cases {
            let shape = test_shape(heads, kv_heads, head_dim, sliding_window);
            let cache = setup(&shape, first + rows, 11);
            let mut seed = 7;
            let q: Vec<f32> = (0..rows * heads * head_dim)
                .map(|_| lcg(&mut seed) * 1.5)
                .collect();
            let span = SpanAttention {
                cache: &cache,
                q: &q,
                first_position: first,
                rows,
            };
            let mut want = vec![f32::NAN; q.len()];
            let mut got = vec![f32::NAN; q.len()];
            let mut scratch = BlockScratch::default();
            // Blocks of odd sizes, the last one short.
            for kv_head in 0..kv_heads {
                let mut t0 = 0;
                for len in [13, 1, 16, 5].iter().cycle() {
                    if t0 >= rows {
                        break;
                    }
                    let block = QueryBlock {
                        shape: &shape,
                        span: &span,
                        kv_head,
                        rows: t0..(t0 + len).min(rows),
                        out: OutPtr(want.as_mut_ptr()),
                        out_first_row: 0,
                    };
                    attend_block_impl(&block, &mut scratch);
                    let block = QueryBlock {
                        out: OutPtr(got.as_mut_ptr()),
                        ..block
                    };
                    // SAFETY: AVX2, FMA and F16C are available (checked above).
                    unsafe { x86::attend_block(&block, &mut scratch) };
                    t0 += len;
                }
            }
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    a.is_finite() && a.to_bits() == b.to_bits(),
                    "heads {heads}/{kv_heads} dim {head_dim} window {sliding_window:?} first \
                     {first} rows {rows}: element {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn sliding_window_limits_the_keys() {
        let shape = AttentionShape {
            heads: 2,
            kv_heads: 1,
            head_dim: 8,
            sliding_window: Some(3),
            score_scale: None,
            softcap: None,
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
        let (_, v, at) = other.at(6);
        let value: Vec<f32> = v[at..at + 8].iter().map(|x| x.to_f32()).collect();
        other.write(6, &[5.0; 8], &value);
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
            score_scale: None,
            softcap: None,
        };
        let mut cache = HostKv::default();
        cache.reserve_positions(1, 4);
        cache.write(0, &[1.0, 2.0, 3.0, 4.0], &[0.5, -1.0, 2.0, 0.25]);
        let mut out = [0f32; 4];
        attend(&shape, &cache, &[0.3, 0.1, -0.2, 0.9], 0, 1, &mut out);
        assert_eq!(out, [0.5, -1.0, 2.0, 0.25]);
    }

    /// A cache made from another's prefix holds the same blocks until it writes one: then that
    /// block alone is copied, the original keeps its values, each shared block is counted once,
    /// and attention over the new cache equals attention over one written from scratch.
    #[test]
    fn a_shared_prefix_is_copied_only_where_written() {
        let shape = AttentionShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            sliding_window: None,
            score_scale: None,
            softcap: None,
        };
        let stride = shape.kv_stride();
        // Keys and values in f16.
        let per_position = 2 * stride * 2;
        let live = KvBytes::default();
        let mut seed = 11;
        let mut rows = |n: usize| -> Vec<f32> { (0..n * stride).map(|_| lcg(&mut seed)).collect() };
        let (k, v) = (rows(150), rows(150));
        let mut a = HostKv::counted_in(&live);
        a.reserve_positions(150, stride);
        a.write(0, &k, &v);
        // Blocks of 64, 64 and 22 positions: no more than asked for.
        assert_eq!(live.get(), 150 * per_position);

        let mut b = a.share_prefix(140);
        assert!((0..3).all(|blk| b.shares_block(&a, blk * KV_BLOCK)));
        assert_eq!(live.get(), 150 * per_position, "sharing allocates nothing");

        let (k2, v2) = (rows(10), rows(10));
        b.reserve_positions(150, stride);
        b.write(140, &k2, &v2);
        assert!(b.shares_block(&a, 0) && b.shares_block(&a, KV_BLOCK));
        assert!(
            !b.shares_block(&a, 2 * KV_BLOCK),
            "the written block was copied"
        );
        assert_eq!(live.get(), (150 + 22) * per_position);
        let (ak, av, at) = a.at(140);
        let want: Vec<f16> = k[140 * stride..141 * stride]
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        assert_eq!(
            &ak[at..at + stride],
            &want[..],
            "the original keeps its keys"
        );
        assert_eq!(av[at], f16::from_f32(v[140 * stride]));

        let mut fresh = HostKv::default();
        fresh.reserve_positions(150, stride);
        fresh.write(0, &k[..140 * stride], &v[..140 * stride]);
        fresh.write(140, &k2, &v2);
        let q: Vec<f32> = (0..70 * shape.heads * shape.head_dim)
            .map(|_| lcg(&mut seed))
            .collect();
        // 70 rows take the tiled path, 1 row the one-row path.
        for (first, n) in [(80, 70), (149, 1)] {
            let q = &q[..n * shape.heads * shape.head_dim];
            let (mut got, mut want) = (vec![0f32; q.len()], vec![0f32; q.len()]);
            attend(&shape, &b, q, first, n, &mut got);
            attend(&shape, &fresh, q, first, n, &mut want);
            assert_eq!(got, want, "rows {first}..{}", first + n);
        }

        drop(b);
        assert_eq!(live.get(), 150 * per_position);
        a.truncate(100);
        assert_eq!(
            live.get(),
            100 * per_position,
            "a cache kept for reuse gives back its tail"
        );
        drop(a);
        assert_eq!(live.get(), 0);
    }
}
