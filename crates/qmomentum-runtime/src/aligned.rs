//! A fixed-length buffer aligned to 64 bytes (one cache line, one zmm register).
//!
//! Packed weights and activation rows are read with full-width vector loads; keeping them
//! cache-line aligned avoids split loads. `Vec<T>` only guarantees `align_of::<T>()`.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Element types that may live in an [`Aligned`] buffer.
///
/// # Safety
/// Implementors must be plain integers or floats: every bit pattern (including all zeros) is a
/// valid value, there is no padding, and `align_of::<Self>() <= 64`.
pub(crate) unsafe trait Plain: Copy + 'static {}
// SAFETY: primitive integers and floats satisfy the trait's contract.
unsafe impl Plain for u8 {}
// SAFETY: as above.
unsafe impl Plain for i8 {}
// SAFETY: as above.
unsafe impl Plain for i16 {}
// SAFETY: as above.
unsafe impl Plain for i32 {}
// SAFETY: as above.
unsafe impl Plain for u32 {}
// SAFETY: as above.
unsafe impl Plain for u64 {}
// SAFETY: as above.
unsafe impl Plain for f32 {}

/// A zero-initialised, 64-byte aligned slice of `len` elements of `T`.
#[derive(Clone)]
pub(crate) struct Aligned<T: Plain> {
    lines: Vec<Line>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Plain> Aligned<T> {
    /// `len` zeros.
    pub(crate) fn zeroed(len: usize) -> Self {
        let bytes = len
            .checked_mul(size_of::<T>())
            .expect("aligned buffer size overflows usize");
        Aligned {
            lines: vec![Line([0; 64]); bytes.div_ceil(64)],
            len,
            _t: PhantomData,
        }
    }

    /// A copy of `src`.
    pub(crate) fn from_slice(src: &[T]) -> Self {
        let mut a = Self::zeroed(src.len());
        a.copy_from_slice(src);
        a
    }
}

impl<T: Plain> Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `lines` holds at least `len·size_of::<T>()` initialised bytes, aligned to 64
        // ≥ align_of::<T>(), and any bit pattern is a valid `T` (trait `Plain`).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<T>(), self.len) }
    }
}

impl<T: Plain> DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`; the exclusive borrow of `self` makes the slice unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<T>(), self.len) }
    }
}

impl<T: Plain + std::fmt::Debug> std::fmt::Debug for Aligned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Aligned[{} × {}]", self.len, std::any::type_name::<T>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let mut a = Aligned::<i32>::zeroed(37);
        assert_eq!(a.len(), 37);
        assert!(a.iter().all(|&v| v == 0));
        assert_eq!(a.as_ptr() as usize % 64, 0);
        a[36] = 5;
        let b = Aligned::from_slice(&a[..]);
        assert_eq!(b[36], 5);
        assert_eq!(Aligned::<u8>::zeroed(0).len(), 0);
    }
}
