//! A small seeded random number generator (PCG-XSL-RR 128/64, O'Neill 2014).
//!
//! Written by hand rather than taken from `rand` because a checkpoint must store the exact
//! generator state and `--resume` must continue the very same stream: the state here is two
//! `u64`s we serialise ourselves, and the stream cannot change under us with a crate upgrade
//! (`rand` does not promise value stability of its distributions across versions).

/// PCG64 (XSL-RR output on a 128-bit LCG).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    state: u128,
    inc: u128,
}

const MUL: u128 = 0x2360_ED05_1FC6_5DA4_4385_DF64_9FCC_F645;

impl Rng {
    /// A generator for `seed`; `stream` selects one of 2^127 independent streams.
    pub fn new(seed: u64, stream: u64) -> Self {
        let inc = ((stream as u128) << 1) | 1;
        let mut r = Rng { state: 0, inc };
        r.step();
        r.state = r
            .state
            .wrapping_add(seed as u128 ^ 0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C834);
        r.step();
        r
    }
    fn step(&mut self) {
        self.state = self.state.wrapping_mul(MUL).wrapping_add(self.inc);
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let s = self.state;
        let rot = (s >> 122) as u32;
        (((s >> 64) as u64) ^ (s as u64)).rotate_right(rot)
    }
    /// Uniform in [0, 1) with 24 bits of precision.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }
    /// Uniform in [lo, hi).
    pub fn uniform_range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }
    /// Uniform integer in [0, n) without modulo bias (Lemire's method).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        loop {
            let x = self.next_u64();
            let m = (x as u128) * (n as u128);
            let lo = m as u64;
            if lo >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }
    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
    /// The state as four u64 words (for checkpoints).
    pub fn to_words(&self) -> [u64; 4] {
        [
            (self.state >> 64) as u64,
            self.state as u64,
            (self.inc >> 64) as u64,
            self.inc as u64,
        ]
    }
    /// Rebuild from [`Rng::to_words`]; `None` if the increment is not odd (not a PCG state).
    pub fn from_words(w: [u64; 4]) -> Option<Self> {
        let inc = ((w[2] as u128) << 64) | w[3] as u128;
        if inc & 1 == 0 {
            return None;
        }
        Some(Rng {
            state: ((w[0] as u128) << 64) | w[1] as u128,
            inc,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn same_seed_same_stream_and_state_round_trip() {
        let mut a = Rng::new(42, 0);
        let mut b = Rng::new(42, 0);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut c = Rng::from_words(a.to_words()).unwrap();
        assert_eq!(a.next_u64(), c.next_u64());
        assert_ne!(Rng::new(1, 0).next_u64(), Rng::new(2, 0).next_u64());
    }
    #[test]
    fn uniform_mean_and_below_bounds() {
        let mut r = Rng::new(7, 1);
        let n = 100_000;
        let mean: f64 = (0..n).map(|_| r.uniform() as f64).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        let mut counts = [0usize; 10];
        for _ in 0..n {
            counts[r.below(10) as usize] += 1;
        }
        for c in counts {
            assert!((c as f64 - 10_000.0).abs() < 500.0, "{counts:?}");
        }
    }
}
