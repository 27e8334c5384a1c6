//! SwiGLU's gating, `silu(gate) · up`, in one pass over the rows and on the thread pool for a
//! batch's rows.
//!
//! Candle runs `silu` and the product as two passes, each on the calling thread below 64 Ki
//! values: a trunk batch of sixteen SmolLM2 rows (24 Ki values per layer) spent 6% of its time
//! there while the pool's other thread waited. The values are candle's bit for bit: the same
//! f32 operations in the same order, `g / (1 + exp(-g))` then `· u`.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Fewest values that go to the thread pool: below it, waking the pool costs more than it
/// saves (one decode row of SmolLM2 has 1536).
const PARALLEL_VALUES: usize = 8192;

/// `silu(gate) · up`, elementwise, for two tensors of the same shape. Runs in one pass on the
/// CPU for f32 values; elsewhere (a GPU, other types) candle's own two operations.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if gate.device().is_cpu() && gate.dtype() == DType::F32 && up.dtype() == DType::F32 {
        gate.contiguous()?
            .apply_op2_no_bwd(&up.contiguous()?, &SwiGlu)
    } else {
        candle_nn::ops::silu(gate)? * up
    }
}

/// The fused operation of [`swiglu`] on CPU storage.
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
        let n = gate_layout.shape().elem_count();
        let gate = &gate.as_slice::<f32>()?[gate_layout.start_offset()..][..n];
        let up = &up.as_slice::<f32>()?[up_layout.start_offset()..][..n];
        let mut out = vec![0f32; n];
        let gated = |(out, (g, u)): (&mut [f32], (&[f32], &[f32]))| {
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        };
        if n < PARALLEL_VALUES {
            gated((&mut out, (gate, up)));
        } else {
            let piece = n
                .div_ceil(rayon::current_num_threads())
                .max(PARALLEL_VALUES / 2);
            out.par_chunks_mut(piece)
                .zip(gate.par_chunks(piece).zip(up.par_chunks(piece)))
                .for_each(gated);
        }
        Ok((CpuStorage::F32(out), gate_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// Values spread over silu's whole range, with its edge cases (zeros, infinities, NaN, the
    /// largest and smallest floats).
    fn values(n: usize, seed: u32) -> Vec<f32> {
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

    #[test]
    fn fused_gating_equals_candles_silu_then_product_bit_for_bit() -> candle_core::Result<()> {
        // One decode row (on this thread) and a batch of sixteen (on the pool), each width.
        for (rows, width) in [(1, 1536), (16, 1536), (7, 5632), (3, 10)] {
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
    fn gate_and_up_of_different_shapes_are_an_error() -> candle_core::Result<()> {
        let gate = Tensor::zeros((2, 8), DType::F32, &Device::Cpu)?;
        let up = Tensor::zeros((2, 9), DType::F32, &Device::Cpu)?;
        let error = swiglu(&gate, &up).unwrap_err().to_string();
        assert!(error.contains("the shapes differ"), "{error}");
        Ok(())
    }
}
