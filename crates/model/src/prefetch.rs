//! Software prefetch: asking the CPU to start loading bytes the code will read soon, so that
//! many loads are in flight at once. Used where the CPU's own prefetchers measured too timid
//! (the decode kernels' weights, decode attention's keys and values).

/// Which cache the bytes are asked into.
#[derive(Clone, Copy)]
pub(crate) enum Hint {
    /// Close to the core but marked as read once, so it evicts little.
    NonTemporal,
    /// The second-level cache.
    L2,
}

/// Asks for the `bytes` bytes from `start`, a line (64 bytes) at a time. Changes no result; may
/// point anywhere, since a prefetch never faults; does nothing on other targets.
#[inline(always)]
pub(crate) fn bytes(start: *const u8, bytes: usize, hint: Hint) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_NTA, _MM_HINT_T2, _mm_prefetch};
        let start = start.cast::<i8>();
        for line in (0..bytes).step_by(64) {
            let at = start.wrapping_add(line);
            // SAFETY: a prefetch reads nothing the program sees and never faults, whatever the
            // address.
            unsafe {
                match hint {
                    Hint::NonTemporal => _mm_prefetch::<_MM_HINT_NTA>(at),
                    Hint::L2 => _mm_prefetch::<_MM_HINT_T2>(at),
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, bytes, hint);
}
