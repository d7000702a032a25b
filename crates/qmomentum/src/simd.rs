//! Element-wise passes compiled for the widest instruction set the CPU has.
//!
//! The crate is built for baseline x86-64, where the compiler vectorises loops with SSE2 only
//! (and turns selects of indices into scalar stores). [`widest!`] defines a function whose body
//! is compiled three times, for AVX-512F, AVX2 and the baseline, and picks one at run time
//! (`is_x86_feature_detected!`, cached by std). The body is the same Rust in all three, without
//! `mul_add`, so no fused multiply-add is formed and float operations keep their order: every
//! version gives the same bits. Used by the optimizer's update loops, the gradient sum, the weight
//! fake quantization, max pooling, batch norm and ReLU (and the portable oscillation-tracking
//! pass); measured on cnn-small: max pooling 9.9 % → 3.0 % of an epoch's samples
//! (`doc/performance.md`). Also here: software prefetch of a memory region ([`prefetch_l2`]).

/// `widest! { fn name(a: A, b: B) -> R { body } }`: see the module doc. The body may only use
/// its arguments (it is a nested function).
macro_rules! widest {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (checked on the line above), the only
                    // requirement of `avx512`, whose body needs nothing else of the CPU (any
                    // `unsafe` inside it states its own reasons).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above, for AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use widest;

/// A region of memory to prefetch: its address and length in bytes. An address, not a
/// reference, so that one core can ask for data another core's job owns (a prefetch reads
/// nothing the program sees).
#[derive(Clone, Copy, Debug)]
pub struct Region {
    /// First byte.
    pub addr: usize,
    /// Length in bytes.
    pub bytes: usize,
}

impl Region {
    /// The bytes of `s`.
    pub fn of<T>(s: &[T]) -> Region {
        Region {
            addr: s.as_ptr() as usize,
            bytes: std::mem::size_of_val(s),
        }
    }
}

/// Ask the CPU to bring `r` into this core's L2 cache without waiting for it (one prefetch per
/// 64-byte line; only a hint, nothing elsewhere than x86-64).
pub fn prefetch_l2(r: Region) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let mut a = r.addr & !63;
        while a < r.addr + r.bytes {
            // SAFETY: a prefetch never faults, whatever the address, and changes no memory; SSE
            // is part of the x86-64 baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(a as *const i8) };
            a += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}
