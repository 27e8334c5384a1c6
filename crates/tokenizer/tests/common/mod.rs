//! Helpers shared by the integration tests.

/// Deterministic pseudo-random generator (xorshift64*), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A character from a mix of ASCII, digits, whitespace, common multi-byte characters,
    /// emoji (with modifiers and joiners) and arbitrary code points of the BMP and the planes
    /// that the default model's byte alphabet covers.
    pub fn char(&mut self) -> char {
        const PICKED: &[char] = &[
            ' ', ' ', ' ', '\t', '\n', '\r', '\u{a0}', '\u{3000}', 'é', 'ß', 'ñ', 'Ω', 'д', 'ع',
            '中', '日', '€', 'ก', 'ー', '한', '🤖', '👍', '🏽', '\u{200d}', '😀', '𝔘', '𐍈',
            '\u{fffd}', '\u{301}', '\'', '"', '<', '>', '|',
        ];
        let pick = |rng: &mut Self, lo: u32, hi: u32| {
            let c = lo + (rng.below(u64::from(hi - lo)) as u32);
            char::from_u32(c).unwrap_or('?')
        };
        match self.below(10) {
            0..=2 => pick(self, 0x61, 0x7b),
            3 => pick(self, 0x30, 0x3a),
            4 => pick(self, 0x20, 0x7f),
            5 | 6 => PICKED[self.below(PICKED.len() as u64) as usize],
            7 => pick(self, 0x80, 0x800),
            8 => pick(self, 0x800, 0xd800),
            // Planes 1-3 and 12-16: SmolLM2's byte alphabet lacks the lead bytes F1 and F2
            // of planes 4-11, so neither llama.cpp nor this crate can encode those.
            _ if self.below(2) == 0 => pick(self, 0x1_0000, 0x4_0000),
            _ => pick(self, 0xc_0000, 0x11_0000),
        }
    }

    pub fn string(&mut self, max_chars: u64) -> String {
        let n = self.below(max_chars + 1);
        (0..n).map(|_| self.char()).collect()
    }
}
