//! Matrix products with quantized weights.
//!
//! candle has no SIMD kernel for Q4_1 (the default model's format) and dots each activation row
//! with each weight row on its own. Here each weight block is unpacked once and dotted with up
//! to four activation rows ([`dot`]) using AVX2 or VNNI, which speeds up decode. Where the
//! CPU has AVX-512 with VNNI, batches (prefill, the trunk server's shared steps) go through
//! the `wide` kernel in groups of four rows, sixteen (weight row, activation row) pairs per
//! instruction. The CPU's best [`KernelPath`] is chosen at run time; all paths compute the same
//! bits. Q5_0 and Q5_1 go through the same four-row kernels, and the K-quants Q2_K, Q3_K, Q4_K,
//! Q5_K and Q6_K through [`kquant`]'s, with activations quantized per 256 values (batches of Q4_K,
//! Q5_K and Q6_K through the `kwide` kernel where the CPU has AVX-512 VNNI). Where the CPU has
//! AMX, batches of 32 rows or more of Q4_0, Q4_1, Q4_K, Q5_K and Q6_K go through the `amx`
//! kernels, sixteen rows by sixteen per tile instruction. Formats we do not cover (floats, the
//! rarer quantized types) keep candle's (whose x86 kernels also choose AVX2 at run time).

#[cfg(target_arch = "x86_64")]
mod amx;
mod dot;
mod kquant;
#[cfg(target_arch = "x86_64")]
mod kwide;
mod path;
#[cfg(target_arch = "x86_64")]
mod wide;

pub use path::KernelPath;

use std::io::Read;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Storage, Tensor};
use rayon::prelude::*;

use dot::{ActBlock, BLOCK, Format, TILE, dot_tile, repack};
use kquant::{KActBlock, KFormat, SUPER};

/// Below this many multiply-adds a product runs on the calling thread: waking the thread pool
/// costs more than it saves. Since a forward pass runs on a pool thread ([`crate::on_pool`]),
/// the pool stays awake between products, and on 2 cores every SmolLM2-135M decode product
/// gains from both threads: about 240 -> 300 tok/s at position 10. With products on one
/// thread, the other fell asleep between layers and every long context attention paid for
/// waking it. (Before `on_pool`, 2^22 was best: each product woke the pool from outside.)
const SERIAL_WORK: usize = 1 << 16;

/// Fewest activation values quantized on the thread pool: a batch's or a prompt's rows. One
/// decode row stays on the calling thread, where waking the pool costs more than it saves; a
/// trunk batch of sixteen SmolLM2 rows spent 4% of its time quantizing on one thread.
const PARALLEL_QUANTIZE: usize = 16 * SUPER;

/// The blocks of `xs` (whole blocks of `block` values) quantized in order by `run`, which
/// fills a run of output blocks from their values: in pieces on the thread pool for long
/// inputs. `empty` fills the output before it is written.
fn quantize_rows<A: Copy + Send + Sync>(
    xs: &[f32],
    block: usize,
    empty: A,
    run: impl Fn(&[f32], &mut [A]) + Sync + Send,
) -> Vec<A> {
    let mut out = vec![empty; xs.len() / block];
    if xs.len() < PARALLEL_QUANTIZE {
        run(xs, &mut out);
    } else {
        let piece = out.len().div_ceil(4 * rayon::current_num_threads());
        out.par_chunks_mut(piece)
            .zip(xs.par_chunks(piece * block))
            .for_each(|(out, xs)| run(xs, out));
    }
    out
}

/// A weight matrix `(out, in)` applied as `x @ Wᵀ`: our kernels where they cover the format,
/// candle's otherwise.
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    /// Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K or Q6_K weights on the CPU.
    Quant(QuantMatrix),
    /// Every other format or device.
    Candle(QMatMul),
    /// f16 or bf16 weights on a GPU: each product runs in the weights' precision, its rows
    /// converted in and the result back to f32.
    Half(Tensor),
}

impl Linear {
    /// Wraps a loaded matrix, choosing our kernels when they cover it.
    pub(crate) fn new(matrix: QMatMul) -> Self {
        match &matrix {
            QMatMul::QTensor(t) => {
                QuantMatrix::new(t.clone()).map_or(Self::Candle(matrix), Self::Quant)
            }
            _ => Self::Candle(matrix),
        }
    }

    /// A GGUF matrix of `dtype` and `dims` (rows, columns) whose blocks `reader` is at, read
    /// and repacked four rows at a time, so that no whole GGUF copy of it is held next to its
    /// tiles; `None`, with nothing read, where our kernels do not cover it.
    pub(crate) fn read_gguf(
        dtype: GgmlDType,
        dims: &[usize],
        reader: &mut impl Read,
    ) -> Option<std::io::Result<Self>> {
        let kind = Kind::of(dtype)?;
        let &[rows, cols] = dims else {
            return None;
        };
        if !QuantMatrix::fits(kind, rows, cols) {
            return None;
        }
        Some(QuantMatrix::read(kind, rows, cols, reader).map(Self::Quant))
    }

    /// Rows `ids` of the matrix, dequantized: embeddings `(ids, cols)` of tokens.
    pub(crate) fn embedding(&self, ids: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::Quant(m) => m.rows_f32(ids),
            Self::Candle(m) => m.embedding(&Tensor::new(ids, device)?),
            Self::Half(w) => w
                .embedding(&Tensor::new(ids, device)?)?
                .to_dtype(candle_core::DType::F32),
        }
    }

    /// `x @ Wᵀ` over the last dimension of `x`.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let [y] = Self::forward_shared([self], x)?;
        Ok(y)
    }

    /// `x @ Wᵀ` for each matrix `W` of `linears`, all of the same input width. Our kernels
    /// quantize `x` once for all of them (and lay it out once per weight format) and run their
    /// products in one parallel region ([`matmul`]): a layer's query, key and value take the
    /// same rows, as do its gate and up.
    pub(crate) fn forward_shared<const N: usize>(
        linears: [&Self; N],
        x: &Tensor,
    ) -> candle_core::Result<[Tensor; N]> {
        let x = x.contiguous()?;
        let ours: Vec<&QuantMatrix> = linears
            .iter()
            .filter_map(|linear| match linear {
                Self::Quant(matrix) => Some(matrix),
                _ => None,
            })
            .collect();
        let mut ours = products(&ours, &x)?.into_iter();
        let mut ys = Vec::with_capacity(N);
        for linear in linears {
            ys.push(match linear {
                Self::Quant(_) => ours.next().expect("one product per matrix of ours"),
                Self::Candle(m) => m.forward(&x)?,
                Self::Half(w) => x
                    .to_dtype(w.dtype())?
                    .broadcast_matmul(&w.t()?)?
                    .to_dtype(x.dtype())?,
            });
        }
        Ok(ys
            .try_into()
            .unwrap_or_else(|_| unreachable!("one product per matrix")))
    }
}

/// How many bytes ahead of the block it is reading a kernel asks for weights. Weights stream
/// from memory once per product, and the CPU's own prefetchers kept too few loads in flight:
/// asking 4 KiB ahead made decode 1.15-1.75x faster across formats (BENCHMARKS.md); 2-8 KiB
/// measured alike, 1 KiB less.
const PREFETCH_AHEAD: usize = 4096;

/// Asks the CPU to start loading into its second-level cache the `bytes` of weights that lie
/// [`PREFETCH_AHEAD`] after `p`, so that they arrive before the kernel reaches them. (The L2
/// hint measured faster than the L1 one.) May point past the weights.
#[inline(always)]
fn prefetch_ahead(p: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T2, _mm_prefetch};
        let ahead = p.wrapping_add(PREFETCH_AHEAD).cast::<i8>();
        for line in (0..bytes).step_by(64) {
            // SAFETY: a prefetch reads nothing the program sees and never faults, whatever the
            // address.
            unsafe { _mm_prefetch::<_MM_HINT_T2>(ahead.wrapping_add(line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
}

/// The GGUF formats our kernels cover, by the kernels that read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Blocks of 32 weights ([`dot`]).
    Blocks(Format),
    /// Super-blocks of 256 weights ([`kquant`]).
    K(KFormat),
}

impl Kind {
    fn of(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => Self::Blocks(Format::Q4_0),
            GgmlDType::Q4_1 => Self::Blocks(Format::Q4_1),
            GgmlDType::Q8_0 => Self::Blocks(Format::Q8_0),
            GgmlDType::Q5_0 => Self::Blocks(Format::Q5_0),
            GgmlDType::Q5_1 => Self::Blocks(Format::Q5_1),
            GgmlDType::Q2K => Self::K(KFormat::Q2K),
            GgmlDType::Q3K => Self::K(KFormat::Q3K),
            GgmlDType::Q4K => Self::K(KFormat::Q4K),
            GgmlDType::Q5K => Self::K(KFormat::Q5K),
            GgmlDType::Q6K => Self::K(KFormat::Q6K),
            _ => return None,
        })
    }

    /// Weights per block.
    fn block(self) -> usize {
        match self {
            Self::Blocks(_) => BLOCK,
            Self::K(_) => SUPER,
        }
    }

    /// Bytes of one GGUF block.
    fn gguf_bytes(self) -> usize {
        match self {
            Self::Blocks(format) => format.block_bytes(),
            Self::K(format) => format.gguf_bytes(),
        }
    }

    /// `rows` GGUF rows (a multiple of [`TILE`]) of `blocks` blocks each, repacked into tiles.
    fn repack(self, gguf: &[u8], rows: usize, blocks: usize) -> Vec<u8> {
        match self {
            Self::Blocks(format) => repack(format, gguf, rows, blocks),
            Self::K(format) => kquant::repack(format, gguf, rows, blocks),
        }
    }

    /// Bytes of one repacked row of `cols` weights.
    fn row_bytes(self, cols: usize) -> usize {
        match self {
            Self::Blocks(format) => cols / BLOCK * format.block_bytes(),
            Self::K(format) => cols / SUPER * format.tile_bytes() / TILE,
        }
    }
}

/// Quantized weights `(rows, cols)` in a format our kernels cover, repacked into tiles of four
/// rows.
#[derive(Clone)]
pub(crate) struct QuantMatrix {
    tiles: Arc<Vec<u8>>,
    kind: Kind,
    rows: usize,
    cols: usize,
}

impl QuantMatrix {
    /// `None` when the format, device or shape is not one these kernels handle.
    fn new(tensor: Arc<QTensor>) -> Option<Self> {
        let kind = Kind::of(tensor.dtype())?;
        let (rows, cols) = tensor.shape().dims2().ok()?;
        let cpu = tensor.device().is_cpu();
        let blocks = cols / kind.block();
        let bytes = rows * blocks * kind.gguf_bytes();
        if !cpu || !Self::fits(kind, rows, cols) || tensor.storage_size_in_bytes() != bytes {
            return None;
        }
        let gguf = tensor.data().ok()?;
        Some(Self {
            tiles: Arc::new(kind.repack(&gguf, rows, blocks)),
            kind,
            rows,
            cols,
        })
    }

    /// Whether the kernels take a matrix of `rows` rows and `cols` columns: whole blocks per
    /// row, whole tiles of rows.
    fn fits(kind: Kind, rows: usize, cols: usize) -> bool {
        cols.is_multiple_of(kind.block()) && rows.is_multiple_of(TILE)
    }

    /// See [`Linear::read_gguf`].
    fn read(kind: Kind, rows: usize, cols: usize, reader: &mut impl Read) -> std::io::Result<Self> {
        let blocks = cols / kind.block();
        let mut gguf = vec![0u8; TILE * blocks * kind.gguf_bytes()];
        let mut tiles = Vec::with_capacity(rows * kind.row_bytes(cols));
        for _ in 0..rows / TILE {
            reader.read_exact(&mut gguf)?;
            tiles.extend_from_slice(&kind.repack(&gguf, TILE, blocks));
        }
        Ok(Self {
            tiles: Arc::new(tiles),
            kind,
            rows,
            cols,
        })
    }
}

impl QuantMatrix {
    /// Rows `ids` dequantized exactly as candle's `to_float` does (`q * d`, plus `m` for Q4_1;
    /// `(d * sc) * q - dmin * m` for Q2_K, Q4_K and Q5_K, `(d * sc) * q` for Q3_K and Q6_K).
    fn rows_f32(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let blocks = self.cols / self.kind.block();
        let tile_bytes = TILE * self.kind.row_bytes(self.cols);
        let mut values = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let id = id as usize;
            if id >= self.rows {
                candle_core::bail!("row {id} of a matrix of {} rows", self.rows);
            }
            let tile = &self.tiles[id / TILE * tile_bytes..][..tile_bytes];
            for block in tile.chunks_exact(tile_bytes / blocks) {
                match self.kind {
                    Kind::Blocks(format) => {
                        let (v, d, min) = dot::portable::unpack(format, block)[id % TILE];
                        values.extend(v.iter().map(|&q| match format {
                            Format::Q4_1 | Format::Q5_1 => q as f32 * d + min,
                            Format::Q4_0 | Format::Q8_0 | Format::Q5_0 => q as f32 * d,
                        }));
                    }
                    Kind::K(format) => {
                        let row = kquant::portable::unpack(format, block, id % TILE);
                        for (t, &q) in row.q.iter().enumerate() {
                            let d = row.d * row.scales[t / 16] as f32;
                            values.push(match format {
                                KFormat::Q2K | KFormat::Q4K | KFormat::Q5K => {
                                    d * q as f32 - row.dmin * row.mins[t / 16] as f32
                                }
                                KFormat::Q3K | KFormat::Q6K => d * q as f32,
                            });
                        }
                    }
                }
            }
        }
        Tensor::from_vec(values, (ids.len(), self.cols), &Device::Cpu)
    }
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantMatrix")
            .field("kind", &self.kind)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

/// A product's input rows as each family of kernels takes them, made by the first product that
/// needs them and kept for the next products of the same rows (see [`Linear::forward_shared`]).
#[derive(Default)]
struct QuantizedInput {
    blocks: Kept<Format>,
    k: Kept<KFormat>,
}

/// The input rows kept for one family: quantized, and laid out for the wide kernels' groups of
/// four rows by weight format and first row.
struct Kept<F: Family> {
    acts: Option<Vec<F::Act>>,
    #[cfg(target_arch = "x86_64")]
    groups: Vec<(F, usize, Vec<F::Group>)>,
}

impl<F: Family> Default for Kept<F> {
    fn default() -> Self {
        Self {
            acts: None,
            #[cfg(target_arch = "x86_64")]
            groups: Vec::new(),
        }
    }
}

/// One family of weight formats as a product uses it: how its input rows are quantized and
/// kept, its four-row tile kernel, and its batch kernels (AMX and wide) on x86-64. Blocks of
/// 32 ([`Format`]) and K-quants ([`KFormat`]) run through the same product code.
trait Family: Copy + PartialEq + Send + Sync + 'static {
    /// One block of quantized activations.
    type Act: Send + Sync;
    /// One block of four activation rows laid out for the wide kernel.
    #[cfg(target_arch = "x86_64")]
    type Group: Send + Sync;
    /// Values per block of activations.
    const BLOCK: usize;

    /// Rows `x` quantized in blocks.
    fn quantize(path: KernelPath, x: &[f32]) -> Vec<Self::Act>;
    /// Where `input` keeps this family's rows.
    fn kept(input: &QuantizedInput) -> &Kept<Self>;
    /// As [`Family::kept`], to fill.
    fn kept_mut(input: &mut QuantizedInput) -> &mut Kept<Self>;
    /// `out[r][w]`: weight row `w` of `tile` times activation row `r`.
    fn dot<const R: usize>(
        self,
        path: KernelPath,
        tile: &[u8],
        acts: [&[Self::Act]; R],
        out: &mut [[f32; TILE]; R],
    );
    /// Whether the AMX kernel reads this format.
    #[cfg(target_arch = "x86_64")]
    fn amx_covers(self) -> bool;
    /// Whether the wide kernel reads this format.
    #[cfg(target_arch = "x86_64")]
    fn wide_covers(self) -> bool;
    /// Rows `acts` (of `blocks` blocks) in the wide kernel's groups of four.
    #[cfg(target_arch = "x86_64")]
    fn groups(self, acts: &[Self::Act], blocks: usize) -> Vec<Self::Group>;
    /// The AMX kernel over `band`'s tiles `weights` and the leading groups of sixteen rows of
    /// `acts`: the rows done (see [`amx::dot_columns`]).
    ///
    /// # Safety
    /// The CPU has AMX, AVX-512 F, BW, VL, VBMI and VNNI, and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn amx(
        self,
        weights: &[u8],
        acts: &[Self::Act],
        blocks: usize,
        band: &mut Band,
    ) -> Option<usize>;
    /// The wide kernel over `band`'s tiles `weights` and `groups`, the first group being rows
    /// `row0..row0 + 4`: the rows done (see [`wide::dot_columns`]).
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW, VL and VNNI.
    #[cfg(target_arch = "x86_64")]
    unsafe fn wide(
        self,
        weights: &[u8],
        groups: &[Self::Group],
        blocks: usize,
        band: &mut Band,
        row0: usize,
    ) -> usize;
}

impl Family for Format {
    type Act = ActBlock;
    #[cfg(target_arch = "x86_64")]
    type Group = wide::ActGroup;
    const BLOCK: usize = BLOCK;

    fn quantize(path: KernelPath, x: &[f32]) -> Vec<ActBlock> {
        ActBlock::quantize_all(path, x)
    }

    fn kept(input: &QuantizedInput) -> &Kept<Self> {
        &input.blocks
    }

    fn kept_mut(input: &mut QuantizedInput) -> &mut Kept<Self> {
        &mut input.blocks
    }

    #[inline]
    fn dot<const R: usize>(
        self,
        path: KernelPath,
        tile: &[u8],
        acts: [&[ActBlock]; R],
        out: &mut [[f32; TILE]; R],
    ) {
        dot_tile(path, self, tile, acts, out);
    }

    #[cfg(target_arch = "x86_64")]
    fn amx_covers(self) -> bool {
        amx::covers_blocks(self)
    }

    #[cfg(target_arch = "x86_64")]
    fn wide_covers(self) -> bool {
        wide::covers(self)
    }

    #[cfg(target_arch = "x86_64")]
    fn groups(self, acts: &[ActBlock], blocks: usize) -> Vec<wide::ActGroup> {
        wide::groups(self, acts, blocks)
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn amx(
        self,
        weights: &[u8],
        acts: &[ActBlock],
        blocks: usize,
        band: &mut Band,
    ) -> Option<usize> {
        // SAFETY: the caller's.
        unsafe { amx::dot_blocks(self, weights, acts, blocks, band) }
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn wide(
        self,
        weights: &[u8],
        groups: &[wide::ActGroup],
        blocks: usize,
        band: &mut Band,
        row0: usize,
    ) -> usize {
        // SAFETY: the caller's.
        unsafe { wide::dot_columns(self, weights, groups, blocks, band, row0) }
    }
}

impl Family for KFormat {
    type Act = KActBlock;
    #[cfg(target_arch = "x86_64")]
    type Group = kwide::KActGroup;
    const BLOCK: usize = SUPER;

    fn quantize(path: KernelPath, x: &[f32]) -> Vec<KActBlock> {
        KActBlock::quantize_all(path, x)
    }

    fn kept(input: &QuantizedInput) -> &Kept<Self> {
        &input.k
    }

    fn kept_mut(input: &mut QuantizedInput) -> &mut Kept<Self> {
        &mut input.k
    }

    #[inline]
    fn dot<const R: usize>(
        self,
        path: KernelPath,
        tile: &[u8],
        acts: [&[KActBlock]; R],
        out: &mut [[f32; TILE]; R],
    ) {
        kquant::dot_tile(path, self, tile, acts, out);
    }

    #[cfg(target_arch = "x86_64")]
    fn amx_covers(self) -> bool {
        amx::covers(self)
    }

    #[cfg(target_arch = "x86_64")]
    fn wide_covers(self) -> bool {
        kwide::covers(self)
    }

    #[cfg(target_arch = "x86_64")]
    fn groups(self, acts: &[KActBlock], blocks: usize) -> Vec<kwide::KActGroup> {
        kwide::groups(self, acts, blocks)
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn amx(
        self,
        weights: &[u8],
        acts: &[KActBlock],
        blocks: usize,
        band: &mut Band,
    ) -> Option<usize> {
        // SAFETY: the caller's.
        unsafe { amx::dot_columns(self, weights, acts, blocks, band) }
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn wide(
        self,
        weights: &[u8],
        groups: &[kwide::KActGroup],
        blocks: usize,
        band: &mut Band,
        row0: usize,
    ) -> usize {
        // SAFETY: the caller's.
        unsafe { kwide::dot_columns(self, weights, groups, blocks, band, row0) }
    }
}

/// The leading activation rows the AMX kernel takes in a product of `m` rows with `n` weight
/// rows on `path`: whole groups of sixteen, on the AMX path, where the weights are whole groups
/// of sixteen rows and the batch is big enough to pay for unpacking them.
#[cfg(target_arch = "x86_64")]
fn amx_rows<F: Family>(family: F, path: KernelPath, m: usize, n: usize) -> Option<usize> {
    (path == KernelPath::Amx
        && m >= amx::MIN_ROWS
        && n.is_multiple_of(amx::ROWS)
        && family.amx_covers())
    .then_some(m / amx::ROWS * amx::ROWS)
}

/// The first activation row the wide kernel takes, after the AMX kernel's, on the AVX-512
/// paths; `None` where it takes none (fewer than a group of four rows left).
#[cfg(target_arch = "x86_64")]
fn wide_from<F: Family>(family: F, path: KernelPath, m: usize, n: usize) -> Option<usize> {
    let from = amx_rows(family, path, m, n).unwrap_or(0);
    (path.avx512() && family.wide_covers() && m - from >= wide::GROUP).then_some(from)
}

/// Makes in `input` what the product of rows `x` `(m, k)` with `n` weight rows of `family`
/// needs on `path`: the quantized rows, the wide kernel's groups.
fn prepare<F: Family>(
    family: F,
    path: KernelPath,
    (m, k, n): (usize, usize, usize),
    x: &[f32],
    input: &mut QuantizedInput,
) {
    let kept = F::kept_mut(input);
    let acts = kept.acts.get_or_insert_with(|| F::quantize(path, x));
    #[cfg(target_arch = "x86_64")]
    if let Some(from) = wide_from(family, path, m, n)
        && !kept.groups.iter().any(|g| (g.0, g.1) == (family, from))
    {
        let blocks = k / F::BLOCK;
        let groups = family.groups(&acts[from * blocks..], blocks);
        kept.groups.push((family, from, groups));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (family, m, k, n, acts);
}

/// The product `out (m, n) = x (m, k) @ Wᵀ` for weights of `family` repacked into `tiles` (of
/// `tile_bytes` each), on `path`, as tasks that each fill a band of whole columns of `out` in
/// place; `input` holds what [`prepare`] made of `x`.
fn bands<'a, F: Family>(
    family: F,
    path: KernelPath,
    (tiles, tile_bytes): (&'a [u8], usize),
    (m, k, n): (usize, usize, usize),
    input: &'a QuantizedInput,
    out: &'a mut [f32],
) -> impl Iterator<Item = BandTask<'a, F>> {
    let kept = F::kept(input);
    let acts = kept.acts.as_deref().expect("rows quantized by prepare");
    let threads = rayon::current_num_threads();
    #[cfg(target_arch = "x86_64")]
    let (amx, groups) = (
        amx_rows(family, path, m, n).is_some(),
        wide_from(family, path, m, n).map(|from| {
            let kept = kept.groups.iter().find(|g| (g.0, g.1) == (family, from));
            kept.expect("groups laid out by prepare").2.as_slice()
        }),
    );
    // Four bands per thread, of one width where the tiles divide evenly, so that the threads
    // finish together (bands of 20, 20, ... and 4 tiles left one thread idle for a sixth of
    // a 576-row product); the AMX kernel takes whole groups of sixteen weight rows in every
    // band but the last.
    #[cfg(target_arch = "x86_64")]
    let unit = if amx { amx::ROWS / TILE } else { 1 };
    #[cfg(not(target_arch = "x86_64"))]
    let unit = 1;
    let tiles_per_task = (n / TILE)
        .div_ceil(threads * 4)
        .next_multiple_of(unit)
        .max(unit);
    let bands = Band::split(out, m, n, tiles_per_task * TILE);
    let weights = tiles.chunks(tiles_per_task * tile_bytes);
    bands
        .into_iter()
        .zip(weights)
        .map(move |(band, weights)| BandTask {
            family,
            path,
            weights,
            tile_bytes,
            acts,
            blocks: k / F::BLOCK,
            #[cfg(target_arch = "x86_64")]
            amx,
            #[cfg(target_arch = "x86_64")]
            groups,
            band,
        })
}

/// One band of one product, a task for the thread pool: the band's tiles `weights` against
/// every row of `acts`, the AMX and wide kernels taking the rows they cover first.
struct BandTask<'a, F: Family> {
    family: F,
    path: KernelPath,
    weights: &'a [u8],
    tile_bytes: usize,
    acts: &'a [F::Act],
    blocks: usize,
    #[cfg(target_arch = "x86_64")]
    amx: bool,
    #[cfg(target_arch = "x86_64")]
    groups: Option<&'a [F::Group]>,
    band: Band<'a>,
}

impl<F: Family> BandTask<'_, F> {
    /// Fills the band.
    fn run(mut self) {
        let (family, weights, acts, blocks) = (self.family, self.weights, self.acts, self.blocks);
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        {
            if self.amx {
                // SAFETY: the AMX path runs only where the CPU has AMX, AVX-512 F, BW, VL,
                // VBMI and VNNI, and F16C.
                let rows = unsafe { family.amx(weights, acts, blocks, &mut self.band) };
                done = rows.expect("bands of whole groups of sixteen weight rows");
            }
            if let Some(groups) = self.groups {
                // SAFETY: the groups exist on the AVX-512 paths only, which run only where the
                // CPU has AVX-512 F, BW, VL and VNNI.
                done += unsafe { family.wide(weights, groups, blocks, &mut self.band, done) };
            }
        }
        for (t, tile) in weights.chunks_exact(self.tile_bytes).enumerate() {
            dot_columns(
                (family, self.path),
                tile,
                acts,
                blocks,
                done,
                &mut self.band,
                t,
            );
        }
    }
}

/// A band of a product of either family of formats.
enum Task<'a> {
    Blocks(BandTask<'a, Format>),
    K(BandTask<'a, KFormat>),
}

impl Task<'_> {
    fn run(self) {
        match self {
            Self::Blocks(task) => task.run(),
            Self::K(task) => task.run(),
        }
    }
}

impl Kind {
    /// [`prepare`] for this kind's family.
    fn prepare(
        self,
        path: KernelPath,
        dims: (usize, usize, usize),
        x: &[f32],
        input: &mut QuantizedInput,
    ) {
        match self {
            Self::Blocks(format) => prepare(format, path, dims, x, input),
            Self::K(format) => prepare(format, path, dims, x, input),
        }
    }

    /// [`bands`] for this kind's family, added to `tasks`.
    fn bands<'a>(
        self,
        path: KernelPath,
        tiles: &'a [u8],
        dims: (usize, usize, usize),
        input: &'a QuantizedInput,
        out: &'a mut [f32],
        tasks: &mut Vec<Task<'a>>,
    ) {
        let tiles = (tiles, TILE * self.row_bytes(dims.1));
        match self {
            Self::Blocks(format) => {
                tasks.extend(bands(format, path, tiles, dims, input, out).map(Task::Blocks))
            }
            Self::K(format) => {
                tasks.extend(bands(format, path, tiles, dims, input, out).map(Task::K))
            }
        }
    }
}

/// `outs[i] (m, n_i) = x (m, k) @ W_iᵀ` for each matrix `(kind, tiles, n_i)` of `matrices`, on
/// `path`: `x` is quantized once per family of formats (and laid out once per format), and
/// every product's bands run in one parallel region, so that products of a few rows (a decode
/// step, a trunk batch) wait once for the pool's slowest thread instead of once each.
fn matmul(
    path: KernelPath,
    matrices: &[(Kind, &[u8], usize)],
    (x, m, k): (&[f32], usize, usize),
    outs: &mut [&mut [f32]],
) {
    // No rows, no products: nothing to quantize or to hand to the pool.
    if m == 0 {
        return;
    }
    let mut input = QuantizedInput::default();
    for &(kind, _, n) in matrices {
        kind.prepare(path, (m, k, n), x, &mut input);
    }
    let mut work = 0;
    let mut tasks = Vec::new();
    for (&(kind, tiles, n), out) in matrices.iter().zip(outs.iter_mut()) {
        work += m * k * n;
        kind.bands(path, tiles, (m, k, n), &input, out, &mut tasks);
    }
    if rayon::current_num_threads() == 1 || work < SERIAL_WORK {
        tasks.into_iter().for_each(Task::run);
    } else {
        tasks.into_par_iter().for_each(Task::run);
    }
}

/// `x @ Wᵀ` for each of `matrices` (all as wide as `x`'s rows) through [`matmul`].
fn products(matrices: &[&QuantMatrix], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
    if matrices.is_empty() {
        return Ok(Vec::new());
    }
    let dims = x.dims();
    let Some((&last, outer)) = dims.split_last() else {
        candle_core::bail!("quantized matmul of a scalar");
    };
    if let Some(w) = matrices.iter().find(|w| w.cols != last) {
        candle_core::bail!(
            "quantized matmul: input {:?} does not match weights ({}, {})",
            dims,
            w.rows,
            w.cols
        );
    }
    let m = outer.iter().product::<usize>();
    let mut outs: Vec<Vec<f32>> = matrices.iter().map(|w| vec![0f32; m * w.rows]).collect();
    {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("quantized matmul of rows that are not on the CPU");
        };
        if !layout.is_contiguous() {
            candle_core::bail!("quantized matmul of rows that are not contiguous");
        }
        let x = &cpu.as_slice::<f32>()?[layout.start_offset()..][..m * last];
        let weights: Vec<_> = matrices
            .iter()
            .map(|w| (w.kind, w.tiles.as_slice(), w.rows))
            .collect();
        let mut outs: Vec<&mut [f32]> = outs.iter_mut().map(Vec::as_mut_slice).collect();
        matmul(KernelPath::active(), &weights, (x, m, last), &mut outs);
    }
    outs.into_iter()
        .zip(matrices)
        .map(|(out, w)| {
            let mut shape = outer.to_vec();
            shape.push(w.rows);
            Tensor::from_vec(out, shape, &Device::Cpu)
        })
        .collect()
}

/// A band of whole tiles' columns of a product's output (`m` rows of `n`, row-major), which one
/// task writes in place while others write theirs: a column-major copy, zeroed then transposed
/// into the output, took about 6% of a K-quant prefill.
pub(crate) struct Band<'a> {
    /// The output's first value.
    out: *mut f32,
    m: usize,
    n: usize,
    /// The band's columns: `first..first + width`.
    first: usize,
    width: usize,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: the bands of one output are disjoint (each writes only its own columns, checked in
// `set`) and borrow the output mutably for their lifetime, so no other code reads or writes it.
unsafe impl Send for Band<'_> {}

impl<'a> Band<'a> {
    /// `out` (`m` rows of `n`) cut into bands of `width` columns (the last may be narrower).
    fn split(out: &'a mut [f32], m: usize, n: usize, width: usize) -> Vec<Self> {
        assert_eq!(out.len(), m * n, "an output of {m} rows of {n}");
        let ptr = out.as_mut_ptr();
        (0..n)
            .step_by(width)
            .map(|first| Band {
                out: ptr,
                m,
                n,
                first,
                width: width.min(n - first),
                _out: std::marker::PhantomData,
            })
            .collect()
    }

    /// Activation rows.
    pub(crate) fn rows(&self) -> usize {
        self.m
    }

    /// Tiles of four weight rows in the band.
    pub(crate) fn tiles(&self) -> usize {
        self.width / TILE
    }

    /// Writes weight rows from the band's tile `t` on times activation row `row`, one value
    /// each, in order.
    #[inline]
    pub(crate) fn set_columns(&mut self, t: usize, row: usize, values: &[f32]) {
        let column = TILE * t;
        assert!(
            column + values.len() <= self.width && row < self.m,
            "inside the band"
        );
        // SAFETY: the values go inside the output (checked above), in this band's columns,
        // which no other band writes.
        let out = unsafe { self.out.add(row * self.n + self.first + column) };
        // SAFETY: as above; `values` cannot be the output, which the band borrows mutably.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), out, values.len()) };
    }

    /// Writes weight row `w` of the band's tile `t` times activation row `row`.
    #[inline]
    pub(crate) fn set(&mut self, t: usize, w: usize, row: usize, value: f32) {
        let column = TILE * t + w;
        assert!(column < self.width && row < self.m, "inside the band");
        // SAFETY: the value is inside the output (checked above) and in this band's columns,
        // which no other band writes.
        unsafe { *self.out.add(row * self.n + self.first + column) = value };
    }
}

/// Tile `t` of `band` (four weight rows) against activation rows `from..`, up to four at a
/// time.
fn dot_columns<F: Family>(
    (family, path): (F, KernelPath),
    tile: &[u8],
    acts: &[F::Act],
    blocks: usize,
    from: usize,
    band: &mut Band,
    t: usize,
) {
    let m = band.rows();
    let row = |i: usize| &acts[i * blocks..(i + 1) * blocks];
    let mut store = |i: usize, results: &[[f32; TILE]]| {
        for (r, result) in results.iter().enumerate() {
            for (w, &v) in result.iter().enumerate() {
                band.set(t, w, i + r, v);
            }
        }
    };
    let mut i = from;
    while i + 4 <= m {
        let mut o = [[0f32; TILE]; 4];
        family.dot(
            path,
            tile,
            [row(i), row(i + 1), row(i + 2), row(i + 3)],
            &mut o,
        );
        store(i, &o);
        i += 4;
    }
    match m - i {
        3 => {
            let mut o = [[0f32; TILE]; 3];
            family.dot(path, tile, [row(i), row(i + 1), row(i + 2)], &mut o);
            store(i, &o);
        }
        2 => {
            let mut o = [[0f32; TILE]; 2];
            family.dot(path, tile, [row(i), row(i + 1)], &mut o);
            store(i, &o);
        }
        1 => {
            let mut o = [[0f32; TILE]; 1];
            family.dot(path, tile, [row(i)], &mut o);
            store(i, &o);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};
    use half::f16;

    use super::*;

    /// The formats our kernels cover.
    const OURS: [GgmlDType; 10] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
    ];

    /// Columns of the test matrices: one K-quant super-block, four blocks of the others.
    fn width(dtype: GgmlDType) -> usize {
        if Kind::of(dtype).is_some_and(|k| k.block() == SUPER) {
            256
        } else {
            128
        }
    }

    fn weights(dtype: GgmlDType, rows: usize, cols: usize) -> candle_core::Result<Arc<QTensor>> {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1)
            .collect();
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu)?;
        Ok(Arc::new(QTensor::quantize(&t, dtype)?))
    }

    fn input(m: usize, cols: usize, seed: usize) -> candle_core::Result<Tensor> {
        let values: Vec<f32> = (0..m * cols)
            .map(|i| (((i + seed) * 104729 % 997) as f32 / 498.5 - 1.0) * 2.0)
            .collect();
        Tensor::from_vec(values, (1, m, cols), &Device::Cpu)
    }

    fn bits(t: &Tensor) -> candle_core::Result<Vec<u32>> {
        Ok(t.flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|v| v.to_bits())
            .collect())
    }

    /// Q4_1, Q8_0, Q5_0, Q5_1, Q2_K and Q3_K outputs equal candle's bit for bit (the K-quants:
    /// candle's AVX2 kernels, which it uses for these 200 rows, not a multiple of its repacked
    /// kernels' 16; on CPUs without AVX2 candle orders its sums differently); Q4_0's, Q4_K's,
    /// Q5_K's and Q6_K's, which sum each block or super-block in integers where candle keeps
    /// eight float lanes, equal them up to float rounding. On aarch64 candle's NEON kernels
    /// order every type's sums their own way, so all compare up to float rounding there.
    fn like_candle(
        dtype: GgmlDType,
        ours: &Tensor,
        theirs: &Tensor,
        what: &str,
    ) -> candle_core::Result<()> {
        let avx2 = KernelPath::Avx2.supported();
        let kind = Kind::of(dtype);
        let k_quant = kind.is_some_and(|k| k.block() == SUPER);
        let exact = matches!(kind, Some(Kind::K(k)) if k.sums_exactly());
        // candle's x86 kernels round as ours do; its aarch64 kernels sum in another order.
        let same_order = cfg!(target_arch = "x86_64") && (!k_quant || avx2);
        if dtype != GgmlDType::Q4_0 && !exact && same_order {
            assert_eq!(bits(ours)?, bits(theirs)?, "{dtype:?} {what} vs candle");
            return Ok(());
        }
        let (a, b) = (
            ours.flatten_all()?.to_vec1::<f32>()?,
            theirs.flatten_all()?.to_vec1::<f32>()?,
        );
        let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff <= 1e-5 * scale,
            "{dtype:?} {what} vs candle: {diff} (scale {scale})"
        );
        Ok(())
    }

    #[test]
    fn batched_rows_equal_rows_alone_and_candles_kernels() -> candle_core::Result<()> {
        for dtype in OURS {
            let k = width(dtype);
            let w = weights(dtype, 200, k)?;
            let ours = Linear::new(QMatMul::QTensor(w.clone()));
            assert!(
                matches!(ours, Linear::Quant(_)),
                "{dtype:?} uses our kernels"
            );
            let theirs = QMatMul::QTensor(w);
            let x = input(7, k, 3)?;
            let batch = ours.forward(&x)?;
            assert_eq!(batch.dims(), &[1, 7, 200]);
            for i in 0..7 {
                let alone = ours.forward(&x.narrow(1, i, 1)?)?;
                assert_eq!(
                    bits(&alone)?,
                    bits(&batch.narrow(1, i, 1)?)?,
                    "{dtype:?} row {i}"
                );
            }
            // candle's generic kernels (the shape is not one of its repacked ones) do the same
            // arithmetic in the same order (Q4_0, Q4_K, Q5_K and Q6_K: the same up to
            // rounding).
            like_candle(dtype, &batch, &theirs.forward(&x)?, "")?;
        }
        Ok(())
    }

    #[test]
    fn every_batch_size_equals_rows_alone_and_candles_kernels() -> candle_core::Result<()> {
        for dtype in OURS {
            let k = width(dtype);
            let w = weights(dtype, 200, k)?;
            let ours = Linear::new(QMatMul::QTensor(w.clone()));
            let theirs = QMatMul::QTensor(w);
            let x = input(71, k, 11)?;
            let alone: Vec<Vec<u32>> = (0..71)
                .map(|i| bits(&ours.forward(&x.narrow(1, i, 1)?)?))
                .collect::<candle_core::Result<_>>()?;
            // Every tail of the wide kernel's passes (groups of four rows, several groups per
            // pass) and of the four-row tiles, and batches larger than one pass.
            for m in (1..=20).chain([33, 64, 71]) {
                let x = x.narrow(1, 0, m)?;
                let batch = ours.forward(&x)?;
                like_candle(dtype, &batch, &theirs.forward(&x)?, &format!("m={m}"))?;
                for (i, alone) in alone.iter().take(m).enumerate() {
                    assert_eq!(
                        alone,
                        &bits(&batch.narrow(1, i, 1)?)?,
                        "{dtype:?} m={m} row {i}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn every_kernel_path_this_cpu_runs_equals_the_portable_one_bit_for_bit()
    -> candle_core::Result<()> {
        let paths = KernelPath::all_supported();
        eprintln!("kernel paths checked: {paths:?}");
        // 208 weight rows: whole groups of sixteen, which the AMX kernel takes; 200: not.
        for (dtype, n) in OURS.into_iter().flat_map(|d| [(d, 200), (d, 208)]) {
            let k = width(dtype);
            let Linear::Quant(q) = Linear::new(QMatMul::QTensor(weights(dtype, n, k)?)) else {
                panic!("{dtype:?} uses our kernels");
            };
            // Single rows, the four-row tiles' tails, several of the wide kernel's groups, and
            // the AMX kernel's groups of sixteen with and without a tail.
            for m in [1, 3, 4, 7, 16, 33, 39, 50, 64] {
                let x = input(m, k, 5)?.flatten_all()?.to_vec1::<f32>()?;
                let run = |path| {
                    let mut out = vec![0f32; m * n];
                    matmul(path, &[(q.kind, &q.tiles, n)], (&x, m, k), &mut [&mut out]);
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                let reference = run(KernelPath::Portable);
                for &path in &paths {
                    let got = run(path);
                    let first = got.iter().zip(&reference).position(|(a, b)| a != b);
                    assert_eq!(
                        first, None,
                        "{path} {dtype:?} n={n} m={m}: first output differing"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_batch_quantized_on_the_pool_equals_its_rows_quantized_one_by_one()
    -> candle_core::Result<()> {
        /// Sixteen rows of `width`: above PARALLEL_QUANTIZE, while each row alone is below it.
        fn check<A: std::fmt::Debug>(
            width: usize,
            quantize: impl Fn(&[f32]) -> Vec<A>,
        ) -> candle_core::Result<()> {
            let x = input(16, width, 3)?.flatten_all()?.to_vec1::<f32>()?;
            let rows: Vec<A> = x.chunks_exact(width).flat_map(&quantize).collect();
            assert_eq!(
                format!("{:?}", quantize(&x)),
                format!("{rows:?}"),
                "{width}"
            );
            Ok(())
        }
        for path in KernelPath::all_supported() {
            check(576, |x| ActBlock::quantize_all(path, x))?;
            check(512, |x| KActBlock::quantize_all(path, x))?;
        }
        Ok(())
    }

    #[test]
    fn products_sharing_their_input_equal_products_alone_bit_for_bit() -> candle_core::Result<()> {
        // Every format twice and in turn with the others, so that quantized rows and groups
        // made for one format are reused by its second matrix and never by another's; 208 and
        // 200 rows: with and without the AMX kernel's groups of sixteen, whose rows the wide
        // kernels' groups then start after.
        let k = 256;
        let mut matrices = Vec::new();
        for dtype in OURS {
            for n in [208, 200] {
                matrices.push(Linear::new(QMatMul::QTensor(weights(dtype, n, k)?)));
            }
        }
        for m in [1, 16, 40] {
            let x = input(m, k, 9)?;
            let alone = matrices
                .iter()
                .map(|w| w.forward(&x))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let refs: [&Linear; 2 * OURS.len()] = std::array::from_fn(|i| &matrices[i]);
            let shared = Linear::forward_shared(refs, &x)?;
            for (i, (a, b)) in alone.iter().zip(&shared).enumerate() {
                assert_eq!(bits(a)?, bits(b)?, "matrix {i}, {m} rows");
            }
        }
        Ok(())
    }

    #[test]
    fn a_product_of_no_rows_or_no_weight_rows_is_empty_on_every_path() -> candle_core::Result<()> {
        for dtype in OURS {
            let k = width(dtype);
            let linear = Linear::new(QMatMul::QTensor(weights(dtype, 200, k)?));
            let Linear::Quant(q) = &linear else {
                panic!("{dtype:?} uses our kernels");
            };
            // A matrix of no weight rows (a malformed file's) beside one that has some.
            let x = input(16, k, 1)?.flatten_all()?.to_vec1::<f32>()?;
            let matrices = [(q.kind, &[][..], 0), (q.kind, &q.tiles[..], 200)];
            for path in KernelPath::all_supported() {
                let mut out = Vec::new();
                matmul(
                    path,
                    &[(q.kind, &q.tiles, 200)],
                    (&[], 0, k),
                    &mut [&mut out],
                );
                assert!(out.is_empty(), "{path} {dtype:?}");
                let (mut none, mut some) = (Vec::new(), vec![0f32; 16 * 200]);
                matmul(path, &matrices, (&x, 16, k), &mut [&mut none, &mut some]);
                assert!(none.is_empty(), "{path} {dtype:?}");
                let mut alone = vec![0f32; 16 * 200];
                matmul(path, &matrices[1..], (&x, 16, k), &mut [&mut alone]);
                assert_eq!(some, alone, "{path} {dtype:?}");
            }
            let none = Tensor::zeros((0, k), candle_core::DType::F32, &Device::Cpu)?;
            assert_eq!(linear.forward(&none)?.dims(), &[0, 200], "{dtype:?}");
        }
        Ok(())
    }

    #[test]
    fn embedding_rows_equal_candles_dequantization() -> candle_core::Result<()> {
        for dtype in OURS {
            let w = weights(dtype, 40, width(dtype))?;
            let ours = Linear::new(QMatMul::QTensor(w.clone()));
            let ids = [0u32, 39, 5, 5, 22];
            let theirs = QMatMul::QTensor(w).embedding(&Tensor::new(&ids, &Device::Cpu)?)?;
            let rows = ours.embedding(&ids, &Device::Cpu)?;
            assert_eq!(bits(&rows)?, bits(&theirs)?, "{dtype:?}");
            let err = ours
                .embedding(&[40], &Device::Cpu)
                .expect_err("row 40 of 40");
            assert!(
                err.to_string().contains("row 40 of a matrix of 40 rows"),
                "{err}"
            );
        }
        Ok(())
    }

    #[test]
    fn matrices_read_from_gguf_bytes_equal_those_from_candles_tensors() -> candle_core::Result<()> {
        for dtype in OURS {
            let k = width(dtype);
            let w = weights(dtype, 40, k)?;
            let bytes = w.data()?.to_vec();
            let Linear::Quant(from_tensor) = Linear::new(QMatMul::QTensor(w)) else {
                panic!("{dtype:?} uses our kernels");
            };
            let Some(Ok(Linear::Quant(read))) = Linear::read_gguf(dtype, &[40, k], &mut &bytes[..])
            else {
                panic!("{dtype:?} is read into tiles");
            };
            assert_eq!(read.tiles, from_tensor.tiles, "{dtype:?}");
            let short = &mut &bytes[..bytes.len() - 1];
            match Linear::read_gguf(dtype, &[40, k], short) {
                Some(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
                other => panic!("{dtype:?}: a short tensor read as {other:?}"),
            }
        }
        // Formats and shapes our kernels do not take are left to candle, nothing read.
        let bytes = [0u8; 4096];
        for (dtype, dims) in [
            (GgmlDType::F16, [16, 256]),
            (GgmlDType::Q4_1, [6, 64]),
            (GgmlDType::Q4K, [4, 100]),
        ] {
            let mut reader = &bytes[..];
            assert!(Linear::read_gguf(dtype, &dims, &mut reader).is_none());
            assert_eq!(reader.len(), bytes.len(), "{dtype:?} {dims:?}");
        }
        Ok(())
    }

    #[test]
    fn other_formats_keep_candles_kernels() -> candle_core::Result<()> {
        let w = weights(GgmlDType::F16, 16, 256)?;
        assert!(matches!(
            Linear::new(QMatMul::QTensor(w)),
            Linear::Candle(_)
        ));
        // Rows that do not fill tiles of four.
        let w = weights(GgmlDType::Q4_1, 6, 64)?;
        assert!(matches!(
            Linear::new(QMatMul::QTensor(w)),
            Linear::Candle(_)
        ));
        let t = Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu)?;
        assert!(matches!(Linear::new(QMatMul::Tensor(t)), Linear::Candle(_)));
        Ok(())
    }

    /// Nanoseconds this thread has run on a CPU (Linux), which other processes on the machine
    /// do not inflate the way they do wall-clock time.
    fn thread_cpu_ns() -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
        stat.split_whitespace()
            .next()
            .and_then(|ns| ns.parse().ok())
            .expect("run time in schedstat")
    }

    /// Multiply-adds per second of CPU time of `matmul` on one thread, on random weights, per
    /// format and shape, for comparing kernels (a timing harness, not a test: it asserts
    /// nothing). Run with `cargo test --release -p lsplit-model --lib matmul_speed -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "timing harness"]
    fn matmul_speed() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a thread pool");
        let kinds = [Format::Q4_0, Format::Q4_1, Format::Q8_0].map(Kind::Blocks);
        for kind in kinds.into_iter().chain(
            [
                KFormat::Q2K,
                KFormat::Q3K,
                KFormat::Q4K,
                KFormat::Q5K,
                KFormat::Q6K,
            ]
            .map(Kind::K),
        ) {
            for (k, n) in [(576, 576), (2048, 5632)] {
                if k % kind.block() != 0 {
                    continue;
                }
                let (blocks, bb) = (k / kind.block(), kind.gguf_bytes());
                let mut gguf: Vec<u8> = (0..n * blocks * bb).map(|_| random() as u8).collect();
                for block in gguf.chunks_exact_mut(bb) {
                    let scale = f16::from_f32(0.01 + (random() % 100) as f32 * 1e-4);
                    block[..2].copy_from_slice(&scale.to_le_bytes());
                    match kind {
                        Kind::Blocks(Format::Q4_1) => {
                            block[2..4].copy_from_slice(&f16::from_f32(-0.05).to_le_bytes())
                        }
                        Kind::K(KFormat::Q4K | KFormat::Q5K) => {
                            block[2..4].copy_from_slice(&scale.to_le_bytes())
                        }
                        Kind::K(KFormat::Q6K) => block[208..].copy_from_slice(&scale.to_le_bytes()),
                        Kind::K(KFormat::Q3K) => block[108..].copy_from_slice(&scale.to_le_bytes()),
                        Kind::K(KFormat::Q2K) => {
                            block[80..82].copy_from_slice(&scale.to_le_bytes());
                            block[82..].copy_from_slice(&scale.to_le_bytes());
                        }
                        Kind::Blocks(_) => {}
                    }
                }
                let tiles = kind.repack(&gguf, n, blocks);
                for m in [1, 16, 64, 256] {
                    let x: Vec<f32> = (0..m * k)
                        .map(|_| (random() % 2001) as f32 / 1000.0 - 1.0)
                        .collect();
                    let mut out = vec![0f32; m * n];
                    for path in KernelPath::all_supported() {
                        // Each product quantizes its input, as a lone product does.
                        let mut product = || {
                            matmul(path, &[(kind, &tiles, n)], (&x, m, k), &mut [&mut out]);
                        };
                        let (runs, ns) = one_thread.install(|| {
                            product();
                            let (start, cpu) = (std::time::Instant::now(), thread_cpu_ns());
                            let mut runs = 0;
                            while runs < 3 || start.elapsed().as_secs_f64() < 0.5 {
                                product();
                                runs += 1;
                            }
                            (runs, thread_cpu_ns() - cpu)
                        });
                        let rate = (m * k * n * runs) as f64 / ns as f64;
                        println!(
                            "{path:11} {kind:?} m={m:3} k={k:4} n={n:4}: {rate:6.2} G \
                             multiply-adds/s"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn wrong_input_width_is_an_error() -> candle_core::Result<()> {
        let ours = Linear::new(QMatMul::QTensor(weights(GgmlDType::Q8_0, 8, 64)?));
        let err = ours
            .forward(&input(2, 32, 0)?)
            .expect_err("32 columns for 64");
        assert!(
            err.to_string().contains("does not match weights (8, 64)"),
            "{err}"
        );
        Ok(())
    }
}
