//! Faults a test can make the trunk worker hit (feature `fault-injection`, which only the test
//! support crate turns on): a panic inside a batch's guard, or one that kills the worker thread.
//! The flag is process-wide, so one test at a time may use it.

use std::sync::atomic::{AtomicU8, Ordering};

const NONE: u8 = 0;
const BATCH: u8 = 1;
const WORKER: u8 = 2;

static NEXT: AtomicU8 = AtomicU8::new(NONE);

/// The next batch any trunk server of this process runs panics inside its guard: that batch's
/// sessions fail with `INTERNAL`, and the server goes on.
pub fn panic_next_batch() {
    NEXT.store(BATCH, Ordering::SeqCst);
}

/// The worker thread of the next trunk server to run a batch panics outside any batch's guard,
/// and dies: the server reports `NOT_SERVING` and `serve` returns an error.
pub fn kill_worker() {
    NEXT.store(WORKER, Ordering::SeqCst);
}

/// Panics if a test asked the next batch to.
pub(crate) fn in_batch() {
    if NEXT
        .compare_exchange(BATCH, NONE, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
    {
        panic!("injected fault: this batch panics");
    }
}

/// Panics if a test asked the worker thread to die.
pub(crate) fn in_worker() {
    if NEXT
        .compare_exchange(WORKER, NONE, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
    {
        panic!("injected fault: the worker thread dies");
    }
}
