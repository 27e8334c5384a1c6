//! The layer body's row-wise operations, RMS norm and SwiGLU's gating, written for a trunk
//! batch's rows: each in one pass, on the thread pool when the rows are many, with candle's
//! values bit for bit (the same f32 operations in the same order).
//!
//! Candle runs both on the calling thread for a batch of sixteen SmolLM2 rows (it goes
//! parallel from 33 rows for the norm, 64 Ki values for `silu` and the product): 8% of a trunk
//! batch's time, while the pool's other thread waited. Its norm adds each row's squares one
//! after another, a chain of dependent additions; here eight rows' chains advance side by side.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::KernelPath;
use crate::silu::silu_times;

/// Fewest values that go to the thread pool: below it, waking the pool costs more than it
/// saves (one decode row of SmolLM2 has 576 values at the norms, 1536 at the gating).
const PARALLEL_VALUES: usize = 8192;

/// Rows whose sums of squares the norm accumulates side by side.
const CHAINS: usize = 8;

/// `x / sqrt(mean(x²) + eps) · alpha` over the last dimension of `x`, as candle's `rms_norm`.
pub(crate) fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if on_cpu_in_f32(x, alpha) {
        x.contiguous()?
            .apply_op2_no_bwd(&alpha.contiguous()?, &RmsNorm { eps })
    } else {
        candle_nn::ops::rms_norm(x, alpha, eps)
    }
}

/// `silu(gate) · up`, elementwise, for two tensors of the same shape, as candle's `silu` then
/// its product.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if on_cpu_in_f32(gate, up) {
        gate.contiguous()?
            .apply_op2_no_bwd(&up.contiguous()?, &SwiGlu)
    } else {
        candle_nn::ops::silu(gate)? * up
    }
}

/// Whether both tensors are f32 on the CPU, where these operations run; elsewhere (a GPU,
/// other types) candle's own do.
fn on_cpu_in_f32(a: &Tensor, b: &Tensor) -> bool {
    a.device().is_cpu() && a.dtype() == DType::F32 && b.dtype() == DType::F32
}

/// The values of a contiguous f32 tensor.
fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    Ok(&storage.as_slice::<f32>()?[layout.start_offset()..][..layout.shape().elem_count()])
}

/// `out` filled by `work` over pieces of whole rows of `width` values: `work(at, input, out)`
/// gets the piece's values of `input` and of `out`, which start at value `at`. On the thread
/// pool for many values, at once otherwise.
fn by_rows(
    input: &[f32],
    width: usize,
    work: impl Fn(usize, &[f32], &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let mut out = vec![0f32; input.len()];
    if input.len() < PARALLEL_VALUES {
        work(0, input, &mut out);
    } else {
        let rows = input.len() / width;
        let piece = rows.div_ceil(rayon::current_num_threads()) * width;
        out.par_chunks_mut(piece)
            .zip(input.par_chunks(piece))
            .enumerate()
            .for_each(|(i, (out, input))| work(i * piece, input, out));
    }
    out
}

/// The operation of [`rms_norm`] on CPU storage.
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "lsplit-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        alpha: &CpuStorage,
        alpha_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let width = x_layout.shape().dims().last().copied().unwrap_or(0);
        let alpha = slice(alpha, alpha_layout)?;
        if alpha.len() != width {
            candle_core::bail!(
                "rms norm of rows of {width} values with {} weights",
                alpha.len()
            );
        }
        if width == 0 {
            // Rows of no values: nothing to normalize (and no chunks of them to cut).
            return Ok((CpuStorage::F32(Vec::new()), x_layout.shape().clone()));
        }
        let eps = self.eps;
        let out = by_rows(slice(x, x_layout)?, width, |_, x, out| {
            for (x, out) in x.chunks(CHAINS * width).zip(out.chunks_mut(CHAINS * width)) {
                let rows = x.len() / width;
                // Each row's squares added in order from zero, as candle's `sum`: a whole set
                // of chains in step (a loop of constant length, kept in registers), fewer rows
                // one after another.
                let mut sums = [0f32; CHAINS];
                if rows == CHAINS {
                    for i in 0..width {
                        for (r, sum) in sums.iter_mut().enumerate() {
                            let v = x[r * width + i];
                            *sum += v * v;
                        }
                    }
                } else {
                    for (row, sum) in x.chunks_exact(width).zip(&mut sums) {
                        *sum = row.iter().fold(0.0, |sum, &v| sum + v * v);
                    }
                }
                for (r, sum) in sums[..rows].iter().enumerate() {
                    let m = (sum / width as f32 + eps).sqrt();
                    let row = r * width..(r + 1) * width;
                    for ((o, &v), &a) in out[row.clone()].iter_mut().zip(&x[row]).zip(alpha) {
                        *o = v / m * a;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

/// The operation of [`swiglu`] on CPU storage.
struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "lsplit-swiglu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if gate_layout.shape() != up_layout.shape() {
            candle_core::bail!(
                "swiglu of gate {:?} and up {:?}: the shapes differ",
                gate_layout.shape(),
                up_layout.shape()
            );
        }
        let up = slice(up, up_layout)?;
        let gate = slice(gate, gate_layout)?;
        let path = KernelPath::active();
        let out = by_rows(gate, 1, |at, gate, out| {
            silu_times(path, gate, &up[at..at + gate.len()], out)
        });
        Ok((CpuStorage::F32(out), gate_layout.shape().clone()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// Values spread over a wide range, with the edge cases (zeros, infinities, NaN, the
    /// largest and smallest floats) first.
    pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
        let special = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            88.7,
            -88.7,
            -104.0,
        ];
        (0..n)
            .map(|i| match special.get(i) {
                Some(&v) => v,
                None => {
                    let bits = (i as u32 ^ seed).wrapping_mul(2654435761).rotate_left(7);
                    (bits as f32 / u32::MAX as f32 - 0.5) * 40.0
                }
            })
            .collect()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    }

    /// One decode row (on this thread), a batch of sixteen (on the pool), rows not a multiple
    /// of the chains, and a short width.
    const SHAPES: [(usize, usize); 5] = [(1, 1536), (16, 576), (16, 1536), (7, 5632), (3, 10)];

    #[test]
    fn fused_gating_equals_candles_silu_then_product_bit_for_bit() -> candle_core::Result<()> {
        for (rows, width) in SHAPES {
            let shape = (1, rows, width);
            let gate = Tensor::from_vec(values(rows * width, 1), shape, &Device::Cpu)?;
            let up = Tensor::from_vec(values(rows * width, 2), shape, &Device::Cpu)?;
            let fused = swiglu(&gate, &up)?;
            let candle = (candle_nn::ops::silu(&gate)? * &up)?;
            assert_eq!(fused.dims(), &[1, rows, width]);
            assert_eq!(bits(&fused), bits(&candle), "{rows} rows of {width}");
        }
        Ok(())
    }

    #[test]
    fn rms_norm_equals_candles_bit_for_bit() -> candle_core::Result<()> {
        for (rows, width) in SHAPES {
            // Rows of ordinary values, and the first with the edge cases.
            let mut x = values(rows * width, 3);
            x[..11].copy_from_slice(&values(11, 0));
            let x = Tensor::from_vec(x, (1, rows, width), &Device::Cpu)?;
            let alpha =
                Tensor::from_vec(values(width + 11, 4)[11..].to_vec(), width, &Device::Cpu)?;
            for eps in [1e-5, 1e-6] {
                let ours = rms_norm(&x, &alpha, eps)?;
                let candle = candle_nn::ops::rms_norm(&x, &alpha, eps)?;
                assert_eq!(ours.dims(), &[1, rows, width]);
                assert_eq!(bits(&ours), bits(&candle), "{rows} rows of {width}");
            }
        }
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_an_error_and_empty_rows_stay_empty() -> candle_core::Result<()> {
        let gate = Tensor::zeros((2, 8), DType::F32, &Device::Cpu)?;
        let up = Tensor::zeros((2, 9), DType::F32, &Device::Cpu)?;
        let error = swiglu(&gate, &up).unwrap_err().to_string();
        assert!(error.contains("the shapes differ"), "{error}");
        let alpha = Tensor::zeros(9, DType::F32, &Device::Cpu)?;
        let error = rms_norm(&gate, &alpha, 1e-5).unwrap_err().to_string();
        assert!(error.contains("rows of 8 values with 9 weights"), "{error}");
        let empty = Tensor::zeros((2, 0), DType::F32, &Device::Cpu)?;
        let alpha = Tensor::zeros(0, DType::F32, &Device::Cpu)?;
        assert_eq!(rms_norm(&empty, &alpha, 1e-5)?.dims(), &[2, 0]);
        Ok(())
    }
}
