//! The kernel tiers and their detection.
//!
//! A module of its own so that [`crate::error`] can name a tier without depending on the
//! kernels (which themselves return [`crate::Error`]).

/// A kernel tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelKind {
    /// Portable Rust loops (the reference).
    Scalar,
    /// AVX2: u8/i8 widened to i16 and multiplied exactly with `vpmaddwd`; POPCNT for bits.
    Avx2,
    /// AVX-512 VNNI: `vpdpbusd`, 64 u8×i8 products per instruction; VPOPCNTDQ for bits.
    Avx512Vnni,
    /// AMX-INT8 for the int8 matrix products (`tdpbusd`, 16,384 u8×i8 products per
    /// instruction), AVX-512 VNNI for everything else.
    Amx,
}

impl std::fmt::Display for KernelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelKind::Scalar => "scalar",
            KernelKind::Avx2 => "AVX2",
            KernelKind::Avx512Vnni => "AVX-512 VNNI",
            KernelKind::Amx => "AMX-INT8",
        })
    }
}

impl KernelKind {
    /// All tiers, slowest first.
    pub const ALL: [KernelKind; 4] = [
        KernelKind::Scalar,
        KernelKind::Avx2,
        KernelKind::Avx512Vnni,
        KernelKind::Amx,
    ];

    /// Whether this CPU can run the tier (cheap: the feature test is cached by `std`).
    pub fn is_available(self) -> bool {
        match self {
            KernelKind::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("popcnt"),
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("popcnt")
            }
            #[cfg(target_arch = "x86_64")]
            KernelKind::Amx => crate::kernels::amx_available(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The tiers this CPU can run, slowest first.
    pub fn available() -> Vec<KernelKind> {
        Self::ALL.into_iter().filter(|k| k.is_available()).collect()
    }

    /// The fastest tier this CPU can run.
    pub fn detect() -> KernelKind {
        Self::ALL
            .into_iter()
            .rev()
            .find(|k| k.is_available())
            .unwrap_or(KernelKind::Scalar)
    }

    /// A short lowercase name (`scalar`, `avx2`, `avx512vnni`, `amx`).
    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Scalar => "scalar",
            KernelKind::Avx2 => "avx2",
            KernelKind::Avx512Vnni => "avx512vnni",
            KernelKind::Amx => "amx",
        }
    }
}
