//! Element-wise passes compiled for the widest instruction set the CPU has.
//!
//! The crate is built for baseline x86-64, where the compiler vectorises loops with SSE2 only
//! (and turns selects of indices into scalar stores). [`widest!`] defines a function whose body
//! is compiled three times, for AVX-512F, AVX2 and the baseline, and picks one at run time
//! (`is_x86_feature_detected!`, cached by std). The body is the same Rust in all three, without
//! `mul_add`, so no fused multiply-add is formed and float operations keep their order: every
//! version gives the same bits. Used by the oscillation-tracking pass, max pooling, batch norm and
//! ReLU; measured on cnn-small: max pooling 9.9 % → 3.0 % of an epoch's samples
//! (`doc/performance.md`).

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
                    // requirement of `avx512`, whose body is safe Rust.
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
