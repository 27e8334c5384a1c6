//! Which kernels this CPU runs, chosen once at run time, so that one binary runs at full speed
//! on every x86-64 CPU: AMX, else AVX-512 VNNI, else AVX2 with FMA and F16C, else portable
//! Rust; NEON on aarch64. Every path computes the same bits (the kernels' tests compare each
//! path the CPU has with the portable one).

use std::fmt;
use std::sync::OnceLock;

/// A set of kernels, from the most portable to the fastest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelPath {
    /// Plain Rust: any CPU.
    Portable,
    /// AVX2, FMA and F16C (x86-64 since 2013).
    Avx2,
    /// The AVX2 kernels with VNNI's `vpdpbusd`, AVX-512 activation quantization and the
    /// 512-bit batch kernel (AVX-512 F, BW, VL and VNNI).
    Avx512Vnni,
    /// The AVX-512 VNNI path with batches of Q4_0, Q4_1, Q4_K, Q5_K and Q6_K products on AMX
    /// tiles (AMX-TILE, AMX-INT8 and AVX-512 VBMI, and an OS that grants the tile state: Linux
    /// 5.16 and later).
    Amx,
    /// NEON (aarch64): the block kernels of Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0; the rest runs
    /// the portable code.
    Neon,
}

/// Every path, most portable first.
const ALL: [KernelPath; 5] = [
    KernelPath::Portable,
    KernelPath::Avx2,
    KernelPath::Avx512Vnni,
    KernelPath::Amx,
    KernelPath::Neon,
];

impl KernelPath {
    /// The path's name, as `LSPLIT_KERNELS` takes it and `lsplit --version` prints it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512Vnni => "avx512-vnni",
            Self::Amx => "amx",
            Self::Neon => "neon",
        }
    }

    /// Whether this CPU runs the path.
    pub fn supported(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni => {
                Self::Avx2.supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Amx => Self::Avx512Vnni.supported() && super::amx::available(),
            #[cfg(target_arch = "aarch64")]
            Self::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            _ => false,
        }
    }

    /// Whether the path runs the AVX-512 kernels (AVX-512 VNNI, and AMX, which adds to it).
    pub fn avx512(self) -> bool {
        matches!(self, Self::Avx512Vnni | Self::Amx)
    }

    /// Every path this CPU runs, most portable first.
    pub fn all_supported() -> Vec<Self> {
        ALL.into_iter().filter(|p| p.supported()).collect()
    }

    /// The path in use: the fastest this CPU runs, or the one `LSPLIT_KERNELS` names if the
    /// CPU runs it (for comparing paths on one machine). Chosen on first use.
    pub fn active() -> Self {
        static ACTIVE: OnceLock<KernelPath> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let best = *Self::all_supported().last().expect("portable always runs");
            let Ok(name) = std::env::var("LSPLIT_KERNELS") else {
                return best;
            };
            match ALL.into_iter().find(|p| p.name() == name) {
                Some(path) if path.supported() => path,
                _ => {
                    tracing::warn!(
                        requested = name,
                        using = best.name(),
                        "LSPLIT_KERNELS names no kernel path this CPU runs (portable, avx2, \
                         avx512-vnni, amx, neon)"
                    );
                    best
                }
            }
        })
    }
}

impl fmt::Display for KernelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
