//! Matrix products with quantized weights.
//!
//! candle has no SIMD kernel for Q4_1 (the default model's format) and dots each activation row
//! with each weight row on its own. Here each weight block is unpacked once and dotted with up
//! to four activation rows ([`dot`]) using AVX2 or VNNI, which speeds up decode and makes prefill
//! and the trunk server's batches cheaper per row. Formats we do not cover keep candle's kernels.

mod dot;

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Shape, Tensor};
use rayon::prelude::*;

use dot::{ActBlock, BLOCK, Format, dot_rows};

/// Below this many multiply-adds a product runs on the calling thread: handing it to the
/// thread pool would cost more than it saves.
const SERIAL_WORK: usize = 1 << 16;

/// A weight matrix `(out, in)` applied as `x @ Wᵀ`: our kernels where they cover the format,
/// candle's otherwise.
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    /// Q4_0, Q4_1 or Q8_0 weights on the CPU.
    Quant(QuantMatrix),
    /// Every other format or device.
    Candle(QMatMul),
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

    /// `x @ Wᵀ` over the last dimension of `x`.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Quant(m) => x.contiguous()?.apply_op1_no_bwd(m),
            Self::Candle(m) => m.forward(x),
        }
    }
}

/// Q4_0, Q4_1 or Q8_0 weights `(rows, cols)` in their GGUF blocks, shared with candle's tensor.
#[derive(Debug, Clone)]
pub(crate) struct QuantMatrix {
    tensor: Arc<QTensor>,
    format: Format,
    rows: usize,
    cols: usize,
}

impl QuantMatrix {
    /// `None` when the format, device or shape is not one these kernels handle.
    fn new(tensor: Arc<QTensor>) -> Option<Self> {
        let format = match tensor.dtype() {
            GgmlDType::Q4_0 => Format::Q4_0,
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q8_0 => Format::Q8_0,
            _ => return None,
        };
        let (rows, cols) = tensor.shape().dims2().ok()?;
        if format == Format::Q8_0 && candle_repacks_q8_0(rows, cols) {
            return None;
        }
        let cpu = tensor.device().is_cpu();
        let bytes = rows * cols / BLOCK * format.block_bytes();
        (cpu && cols % BLOCK == 0 && tensor.storage_size_in_bytes() == bytes).then_some(Self {
            tensor,
            format,
            rows,
            cols,
        })
    }
}

/// Whether candle multiplies these Q8_0 weights with its own repacked VNNI kernels (columns a
/// multiple of 256, rows of 16, a CPU with VNNI): they are as fast as ours, and keeping them
/// keeps our results equal to candle-transformers' on the same file.
fn candle_repacks_q8_0(rows: usize, cols: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    let vnni = (is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni"))
        || (is_x86_feature_detected!("avxvnni") && is_x86_feature_detected!("avx2"));
    #[cfg(not(target_arch = "x86_64"))]
    let vnni = false;
    vnni && cols % 256 == 0 && rows % 16 == 0
}

impl CustomOp1 for QuantMatrix {
    fn name(&self) -> &'static str {
        "lsplit-quant-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        let Some((&last, outer)) = dims.split_last() else {
            candle_core::bail!("quantized matmul of a scalar");
        };
        if last != self.cols || !layout.is_contiguous() {
            candle_core::bail!(
                "quantized matmul: input {:?} does not match weights ({}, {})",
                dims,
                self.rows,
                self.cols
            );
        }
        let m = outer.iter().product::<usize>();
        let x = &storage.as_slice::<f32>()?[layout.start_offset()..][..m * self.cols];
        let weights = self.tensor.data()?;
        let mut out = vec![0f32; m * self.rows];
        matmul(
            self.format,
            &weights,
            (m, self.cols, self.rows),
            x,
            &mut out,
        );
        let mut shape = outer.to_vec();
        shape.push(self.rows);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// `out (m, n) = x (m, k) @ Wᵀ` for weights `w` of `n` rows in `format`.
fn matmul(format: Format, w: &[u8], (m, k, n): (usize, usize, usize), x: &[f32], out: &mut [f32]) {
    let blocks = k / BLOCK;
    let row_bytes = blocks * format.block_bytes();
    let acts: Vec<ActBlock> = x.chunks_exact(BLOCK).map(ActBlock::quantize).collect();
    let threads = rayon::current_num_threads();
    let chunk = n.div_ceil(threads * 4).max(16);
    // Each task fills whole columns (one weight row against every activation row), so the
    // results are laid out column by column and transposed at the end.
    let mut by_column = vec![0f32; n * m];
    let task = |(c, dst): (usize, &mut [f32])| {
        for (j, column) in dst.chunks_exact_mut(m).enumerate() {
            let row = c * chunk + j;
            let weights = &w[row * row_bytes..(row + 1) * row_bytes];
            dot_column(format, weights, &acts, blocks, column);
        }
    };
    if threads == 1 || m * n * k < SERIAL_WORK {
        by_column.chunks_mut(chunk * m).enumerate().for_each(task);
    } else {
        by_column
            .par_chunks_mut(chunk * m)
            .enumerate()
            .for_each(task);
    }
    for (j, column) in by_column.chunks_exact(m).enumerate() {
        for (i, &v) in column.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
}

/// One weight row against every activation row, four at a time.
fn dot_column(format: Format, w: &[u8], acts: &[ActBlock], blocks: usize, column: &mut [f32]) {
    let row = |i: usize| &acts[i * blocks..(i + 1) * blocks];
    let mut quads = column.chunks_exact_mut(4);
    let mut i = 0;
    for quad in &mut quads {
        let mut o = [0f32; 4];
        dot_rows(
            format,
            w,
            [row(i), row(i + 1), row(i + 2), row(i + 3)],
            &mut o,
        );
        quad.copy_from_slice(&o);
        i += 4;
    }
    match quads.into_remainder() {
        [a, b, c] => {
            let mut o = [0f32; 3];
            dot_rows(format, w, [row(i), row(i + 1), row(i + 2)], &mut o);
            [*a, *b, *c] = o;
        }
        [a, b] => {
            let mut o = [0f32; 2];
            dot_rows(format, w, [row(i), row(i + 1)], &mut o);
            [*a, *b] = o;
        }
        [a] => {
            let mut o = [0f32; 1];
            dot_rows(format, w, [row(i)], &mut o);
            *a = o[0];
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    use super::*;

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

    #[test]
    fn batched_rows_equal_rows_alone_and_candles_kernels_bit_for_bit() -> candle_core::Result<()> {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let w = weights(dtype, 200, 128)?;
            let ours = Linear::new(QMatMul::QTensor(w.clone()));
            assert!(
                matches!(ours, Linear::Quant(_)),
                "{dtype:?} uses our kernels"
            );
            let theirs = QMatMul::QTensor(w);
            let x = input(7, 128, 3)?;
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
            // arithmetic in the same order.
            assert_eq!(
                bits(&batch)?,
                bits(&theirs.forward(&x)?)?,
                "{dtype:?} vs candle"
            );
        }
        Ok(())
    }

    #[test]
    fn other_formats_keep_candles_kernels() -> candle_core::Result<()> {
        let w = weights(GgmlDType::Q4K, 16, 256)?;
        assert!(matches!(
            Linear::new(QMatMul::QTensor(w)),
            Linear::Candle(_)
        ));
        let t = Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu)?;
        assert!(matches!(Linear::new(QMatMul::Tensor(t)), Linear::Candle(_)));
        Ok(())
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
