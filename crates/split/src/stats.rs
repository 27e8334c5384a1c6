use std::fmt;
use std::time::Duration;

/// Where the time and the bytes of one generation went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Tokens of the prompt (prefilled in one pass).
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Time in the head (embeddings and first layers), encoding included.
    pub head: Duration,
    /// Time waiting for the trunk: its compute, plus the network when remote.
    pub trunk: Duration,
    /// Time in the tail (last layers, norm, LM head), decoding included.
    pub tail: Duration,
    /// Time choosing tokens.
    pub sampling: Duration,
    /// Wall time of the prompt pass.
    pub prefill: Duration,
    /// Wall time of the one-token steps.
    pub decode: Duration,
    /// Encoded bytes sent to the trunk.
    pub bytes_up: u64,
    /// Encoded bytes received from the trunk.
    pub bytes_down: u64,
    /// Steps after the prompt: round trips to the trunk when split.
    pub decode_steps: usize,
    /// Tokens those steps ran and kept (one per step without drafting).
    pub decode_tokens: usize,
    /// Drafted tokens sent for checking, and those kept.
    pub drafted_tokens: usize,
    /// Drafted tokens that were the model's own choice, kept without a step of their own.
    pub accepted_tokens: usize,
    /// Time drafting tokens on the device (early exit, draft model, lookup).
    pub drafting: Duration,
    /// Compute: rows times decoder layers run by every part together, catch-ups included
    /// (positions times layers without random split points).
    pub layer_rows: u64,
    /// Rows sent up again for earlier positions, for the trunk to catch up (random split).
    pub catch_up_rows_up: u64,
    /// Rows received again for earlier positions, for the tail to catch up (random split).
    pub catch_up_rows_down: u64,
}

impl Stats {
    /// Prompt tokens per second of the prefill pass.
    pub fn prefill_tokens_per_second(&self) -> f64 {
        per_second(self.prompt_tokens, self.prefill)
    }

    /// Tokens per second of the steps after the prompt.
    pub fn decode_tokens_per_second(&self) -> f64 {
        per_second(self.decode_tokens, self.decode)
    }

    /// Tokens kept per step after the prompt: 1 without drafting.
    pub fn tokens_per_step(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_steps.max(1) as f64
    }

    /// Positions kept (prompt plus the tokens the steps after it kept); per-token bytes count
    /// rejected drafts against these.
    pub fn positions(&self) -> usize {
        self.prompt_tokens + self.decode_tokens
    }
}

fn per_second(count: usize, time: Duration) -> f64 {
    if time.is_zero() {
        0.0
    } else {
        count as f64 / time.as_secs_f64()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let positions = self.positions().max(1) as f64;
        writeln!(
            f,
            "tokens: {} prompt, {} generated",
            self.prompt_tokens, self.generated_tokens
        )?;
        writeln!(
            f,
            "time: head {:.1} ms, trunk {:.1} ms, tail {:.1} ms, sampling {:.1} ms",
            ms(self.head),
            ms(self.trunk),
            ms(self.tail),
            ms(self.sampling)
        )?;
        writeln!(
            f,
            "wire: {} B up, {} B down ({:.0} B up, {:.0} B down per token)",
            self.bytes_up,
            self.bytes_down,
            self.bytes_up as f64 / positions,
            self.bytes_down as f64 / positions
        )?;
        writeln!(
            f,
            "compute: {} layer-rows ({:.2} layers per position); catch-up: {} rows up, {} rows down",
            self.layer_rows,
            self.layer_rows as f64 / positions,
            self.catch_up_rows_up,
            self.catch_up_rows_down
        )?;
        writeln!(
            f,
            "steps: {} after the prompt, {:.2} tokens per step; drafted {}, accepted {} \
             (drafting {:.1} ms)",
            self.decode_steps,
            self.tokens_per_step(),
            self.drafted_tokens,
            self.accepted_tokens,
            ms(self.drafting)
        )?;
        write!(
            f,
            "speed: prefill {:.1} tokens/s, decode {:.1} tokens/s",
            self.prefill_tokens_per_second(),
            self.decode_tokens_per_second()
        )
    }
}
