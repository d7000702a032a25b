//! The three products of a convolution without im2col columns ("implicit GEMM"), for a
//! one-group, stride-1, undilated convolution with an odd kernel and "same" padding
//! (cnn-small's second layer): [`ImplicitGemm::applies`].
//!
//! The input is copied into a **padded grid** where `pw = (kw − 1)/2` zero columns separate the
//! rows of an image and `ph = (kh − 1)/2` zero rows separate the images (each zero column is the
//! right padding of one row and the left padding of the next; each zero row the bottom padding
//! of one image and the top padding of the next). On that grid, pixel `(b, y, x)` is row
//! `p = (b·HP + y)·WP + x` (`HP = h + ph`, `WP = w + pw`), and the window of the output at `p`
//! starts `ph·WP + pw` rows before it, so for each kernel row `ky` the windows' `kw·cin`
//! values are one strided matrix whose rows overlap (row stride `cin`):
//!
//! - forward `z_grid = Σ_ky A_ky·W_ky` (`A_ky[p, :]` = the `kw` pixels from grid row
//!   `p − ph·WP − pw + ky·WP`, `W_ky` = the kernel's rows of `ky`, K = `kw·cin`);
//! - weight gradient `dW_ky = A_kyᵀ·dz_grid` (`dz` on the same grid, zero off the outputs);
//! - input gradient `dx_grid = Σ_ky D_ky·F_ky`: grid row `q` receives the outputs
//!   `q + ph·WP + pw − ky·WP − kx`, which for `kx = kw−1 … 0` are `kw` adjacent rows of
//!   `dz_grid` (K = `kw·cout`), against the kernel row flipped in `kx` and transposed (`F_ky`).
//!
//! The grid has `(h + ph)(w + pw)` rows per image instead of `h·w` (cnn-small: 225 for 196).
//! On the `gemm` crate the products compute the rows between the images' pixels too and throw
//! them away; the hand-written kernels (`conv_implicit/avx512.rs`, on CPUs with AVX-512F)
//! compute the pixels' rows only, each reading its window at its grid row ([`ImplicitGemm`]'s
//! `rowmap`), and write the output in place.
//!
//! What is saved is the columns (`kh·kw` times the input, 14.4 MB per core and step for
//! cnn-small's conv2), written and read twice, and their gradient written and read back:
//! measured on cnn-small's conv2 by `examples/conv_lowering.rs` (`doc/performance.md`, twelfth
//! and thirteenth sessions).
//!
//! The sums over K are cut by kernel row, where the im2col product does not cut them: the
//! results equal im2col's to rounding, not bit for bit.

use super::conv2d::Geometry;
use crate::gemm::{matmul_strided, Strides};

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Kernel rows the hand-written kernels take (their tap offsets are a fixed array).
const MAX_TAPS: usize = 15;

/// Whether the hand-written kernels (`conv_implicit/avx512.rs`) compute a pass whose output has
/// `n` columns, for a kernel of `kh` rows, here; else each kernel row is a product on the `gemm`
/// crate.
fn by_hand(n: usize, kh: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        kh <= MAX_TAPS && avx512::usable(n)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (n, kh);
        false
    }
}

/// The padded-grid buffers of one convolution (grown to the largest batch seen, never shrunk;
/// the padding rows and columns are never written, so they stay zero).
#[derive(Clone, Debug, Default)]
pub struct ImplicitGemm {
    /// The input on the grid, with `margin` zero rows before and after.
    xp: Vec<f32>,
    /// The product on the grid.
    zp: Vec<f32>,
    /// `∂L/∂z` on the grid, with the margins (zero off the outputs).
    dzp: Vec<f32>,
    /// `∂L/∂x` on the grid.
    dxp: Vec<f32>,
    /// `F_ky` for each kernel row: `[kh][kw·cout][cin]`, rebuilt from the kernel each backward.
    wflip: Vec<f32>,
    /// The grid row of each pixel (the hand-written kernels' rows) for the batch and geometry
    /// in `rowmap_key`.
    rowmap: Vec<u32>,
    rowmap_key: RowmapKey,
    /// Grid rows of `xp` that may hold pixels: a smaller batch zeroes the rest, which the
    /// weight gradient multiplies by the zero gradient of the rows between outputs (a stale
    /// non-finite value would make 0·∞ = NaN).
    filled: usize,
}

/// What [`ImplicitGemm::map_rows`] built the row map for: the batch, the image's height and
/// width, and the grid's.
type RowmapKey = (usize, usize, usize, usize, usize);

/// The grid's dimensions.
#[derive(Clone, Copy)]
struct Grid {
    /// Grid rows per image row and image rows per image (pixels and padding).
    wp: usize,
    hp: usize,
    /// Zero grid rows before the first image (and at least as many after the last).
    margin: usize,
    /// How far before an output its window starts: `ph·WP + pw`.
    back: usize,
}

impl Grid {
    /// Where kernel row `ky`'s windows start in the input grid (values of `cin` channels): the
    /// output at grid row `p` reads grid row `p − back + ky·WP` (forward and weight gradient).
    fn input_tap(self, ky: usize, cin: usize) -> usize {
        (self.margin - self.back + ky * self.wp) * cin
    }
}

impl ImplicitGemm {
    /// Whether this lowering computes `geo`'s products: one group, stride 1, dilation 1, an odd
    /// kernel larger than 1×1 with the same padding on both sides of each axis, equal to half
    /// the kernel (the output is as large as the input), and more than one input and output
    /// channel (one input channel per group takes the kernel-position-major columns instead;
    /// the `gemm` crate handles one output channel as a matrix-vector product).
    pub fn applies(geo: &Geometry, groups: usize) -> bool {
        let [kh, kw] = geo.kernel;
        let [t, l, b, r] = geo.pad;
        groups == 1
            && geo.stride == [1, 1]
            && geo.dilation == [1, 1]
            && kh % 2 == 1
            && kw % 2 == 1
            && kh * kw > 1
            && t == kh / 2
            && b == t
            && l == kw / 2
            && r == l
            && geo.input.c > 1
            && geo.output.c > 1
    }

    fn grid(geo: &Geometry) -> Grid {
        let (ph, pw) = (geo.pad[0], geo.pad[1]);
        let (wp, hp) = (geo.input.w + pw, geo.input.h + ph);
        let back = ph * wp + pw;
        Grid {
            wp,
            hp,
            margin: back,
            back,
        }
    }

    /// Grid rows of `batch` images.
    fn rows(geo: &Geometry, batch: usize) -> usize {
        let g = Self::grid(geo);
        batch * g.hp * g.wp
    }

    /// The offsets `tap(ky)` of the kernel rows `ky < kh ≤ MAX_TAPS` (then unused zeros).
    fn taps(kh: usize, tap: impl Fn(usize) -> usize) -> [usize; MAX_TAPS] {
        let mut t = [0; MAX_TAPS];
        for (ky, t) in t[..kh].iter_mut().enumerate() {
            *t = tap(ky);
        }
        t
    }

    /// The grid row of pixel row `by = b·h + y`'s first pixel.
    fn row_start(g: Grid, h: usize, by: usize) -> usize {
        (by / h * g.hp + by % h) * g.wp
    }

    /// `z = conv(x, w)` for `batch` samples (`x`: `batch·h·w·cin`, `w`: `[kh·kw·cin, cout]`,
    /// `z`: `batch·h·w·cout`, the rows of the im2col product).
    pub fn forward(&mut self, geo: &Geometry, x: &[f32], w: &[f32], z: &mut [f32], batch: usize) {
        let g = Self::grid(geo);
        let (i, cout) = (geo.input, geo.output.c);
        let (kh, kw) = (geo.kernel[0], geo.kernel[1]);
        let rows = Self::rows(geo, batch);
        grow(&mut self.xp, (rows + 2 * g.margin) * i.c);
        if self.filled > rows {
            self.xp[(g.margin + rows) * i.c..(g.margin + self.filled) * i.c].fill(0.0);
        }
        self.filled = rows;
        for (by, src) in x[..batch * i.len()].chunks_exact(i.w * i.c).enumerate() {
            let at = (g.margin + Self::row_start(g, i.h, by)) * i.c;
            self.xp[at..at + src.len()].copy_from_slice(src);
        }
        let k = kw * i.c;
        let z = &mut z[..batch * i.h * i.w * cout];
        if by_hand(cout, kh) {
            // Tap ky reads grid row p − back + ky·WP for the output at grid row p; the outputs
            // are written in place, only at the pixels.
            let taps = Self::taps(kh, |ky| g.input_tap(ky, i.c));
            self.map_rows(geo, batch);
            #[cfg(target_arch = "x86_64")]
            avx512::tap_rows(&self.xp, &taps[..kh], i.c, k, &self.rowmap, w, cout, z);
            return;
        }
        grow(&mut self.zp, rows * cout);
        for ky in 0..kh {
            let a = &self.xp[g.input_tap(ky, i.c)..];
            matmul_strided(
                rows,
                cout,
                k,
                a,
                Strides::row_major(i.c),
                &w[ky * k * cout..],
                Strides::row_major(cout),
                &mut self.zp,
                Strides::row_major(cout),
                ky > 0,
            );
        }
        for (by, dst) in z.chunks_exact_mut(i.w * cout).enumerate() {
            let at = Self::row_start(g, i.h, by) * cout;
            dst.copy_from_slice(&self.zp[at..at + dst.len()]);
        }
    }

    /// `∂L/∂z` onto the grid (call before [`ImplicitGemm::weight_grad`] and
    /// [`ImplicitGemm::input_grad`]).
    pub fn load_output_grad(&mut self, geo: &Geometry, dz: &[f32], batch: usize) {
        let g = Self::grid(geo);
        let (o, cout) = (geo.output, geo.output.c);
        let rows = Self::rows(geo, batch);
        grow(&mut self.dzp, (rows + 2 * g.margin) * cout);
        for (by, src) in dz[..batch * o.len()].chunks_exact(o.w * cout).enumerate() {
            let at = (g.margin + Self::row_start(g, o.h, by)) * cout;
            self.dzp[at..at + src.len()].copy_from_slice(src);
        }
    }

    /// `dW = colᵀ·dz` from the input of the last [`ImplicitGemm::forward`] and the gradient of
    /// [`ImplicitGemm::load_output_grad`], into `gw` (`[kh·kw·cin, cout]`). Panics if that
    /// forward pass had another batch or geometry.
    pub fn weight_grad(&self, geo: &Geometry, gw: &mut [f32], batch: usize) {
        let g = Self::grid(geo);
        let (cin, cout) = (geo.input.c, geo.output.c);
        let (kh, kw) = (geo.kernel[0], geo.kernel[1]);
        let rows = Self::rows(geo, batch);
        let k = kw * cin;
        if by_hand(cout, kh) {
            let taps = Self::taps(kh, |ky| g.input_tap(ky, cin));
            let i = geo.input;
            assert!(
                self.rowmap_key == (batch, i.h, i.w, g.hp, g.wp) && self.rowmap.len() == batch * i.h * i.w,
                "ImplicitGemm::weight_grad: after a forward pass of the same batch and geometry"
            );
            #[cfg(target_arch = "x86_64")]
            avx512::tap_weight_grad(
                &self.xp,
                &taps[..kh],
                cin,
                k,
                &self.rowmap,
                &self.dzp[g.margin * cout..],
                cout,
                gw,
            );
            return;
        }
        for ky in 0..kh {
            let a = &self.xp[g.input_tap(ky, cin)..];
            matmul_strided(
                k,
                cout,
                rows,
                a,
                Strides::transposed(cin),
                &self.dzp[g.margin * cout..],
                Strides::row_major(cout),
                &mut gw[ky * k * cout..(ky + 1) * k * cout],
                Strides::row_major(cout),
                false,
            );
        }
    }

    /// `dx = col2im(dz·Wᵀ)` from the gradient of [`ImplicitGemm::load_output_grad`], into `dx`
    /// (`batch·h·w·cin`, overwritten).
    pub fn input_grad(&mut self, geo: &Geometry, w: &[f32], dx: &mut [f32], batch: usize) {
        let g = Self::grid(geo);
        let (i, cout) = (geo.input, geo.output.c);
        let (kh, kw) = (geo.kernel[0], geo.kernel[1]);
        let rows = Self::rows(geo, batch);
        let k = kw * cout;
        // F_ky[(kw − 1 − kx)·cout + co][ci] = W[(ky·kw + kx)·cin + ci][co].
        grow(&mut self.wflip, kh * k * i.c);
        for ky in 0..kh {
            for kx in 0..kw {
                for ci in 0..i.c {
                    let src = &w[((ky * kw + kx) * i.c + ci) * cout..][..cout];
                    let at = (ky * kw + kw - 1 - kx) * cout;
                    for (co, &v) in src.iter().enumerate() {
                        self.wflip[(at + co) * i.c + ci] = v;
                    }
                }
            }
        }
        // Grid row q: the outputs q + back − ky·WP − (kw − 1) … q + back − ky·WP.
        let tap = |ky: usize| (g.margin + g.back - ky * g.wp - (kw - 1)) * cout;
        let dx = &mut dx[..batch * i.len()];
        if by_hand(i.c, kh) {
            let taps = Self::taps(kh, tap);
            self.map_rows(geo, batch);
            #[cfg(target_arch = "x86_64")]
            avx512::tap_rows(&self.dzp, &taps[..kh], cout, k, &self.rowmap, &self.wflip, i.c, dx);
            return;
        }
        grow(&mut self.dxp, rows * i.c);
        for ky in 0..kh {
            matmul_strided(
                rows,
                i.c,
                k,
                &self.dzp[tap(ky)..],
                Strides::row_major(cout),
                &self.wflip[ky * k * i.c..],
                Strides::row_major(i.c),
                &mut self.dxp,
                Strides::row_major(i.c),
                ky > 0,
            );
        }
        for (by, dst) in dx.chunks_exact_mut(i.w * i.c).enumerate() {
            let at = Self::row_start(g, i.h, by) * i.c;
            dst.copy_from_slice(&self.dxp[at..at + dst.len()]);
        }
    }

    /// [`ImplicitGemm::rowmap`] for `batch` images of `geo` (kept while both stay).
    fn map_rows(&mut self, geo: &Geometry, batch: usize) {
        let (g, i) = (Self::grid(geo), geo.input);
        let key = (batch, i.h, i.w, g.hp, g.wp);
        if self.rowmap_key == key && self.rowmap.len() == batch * i.h * i.w {
            return;
        }
        self.rowmap.clear();
        for by in 0..batch * i.h {
            let start = Self::row_start(g, i.h, by);
            let last = u32::try_from(start + i.w).expect("a grid of fewer than 2³² rows");
            self.rowmap.extend(last - i.w as u32..last);
        }
        self.rowmap_key = key;
    }
}

/// Grow `v` with zeros to at least `n` values (never shrinks: the zero padding stays).
fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::conv2d::{Conv2d, Conv2dConfig, Padding};
    use crate::layers::{Activation, Shape};
    use crate::rng::Rng;

    fn rand(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.uniform_range(-1.0, 1.0)).collect()
    }

    /// The three products against their definition on im2col columns (`col·W`, `colᵀ·dz`,
    /// col2im of `dz·Wᵀ`, summed in f64), for kernels 3×3, 5×3 and 1×3, and a batch smaller
    /// than the one before whose stale rows held non-finite values.
    #[test]
    fn products_match_the_columns_definition() {
        let mut rng = Rng::new(3, 0);
        for (shape, kernel, cout) in [
            (Shape::new(5, 6, 3), [3, 3], 4),
            (Shape::new(7, 4, 2), [5, 3], 3),
            (Shape::new(3, 5, 5), [1, 3], 2),
            // Multiples of 16 channels: the hand-written kernels where the CPU has them
            // (forward 32 columns and input gradient 16; forward 16 and input gradient 32).
            (Shape::new(5, 6, 16), [3, 3], 32),
            (Shape::new(4, 3, 32), [5, 3], 16),
        ] {
            let cfg = Conv2dConfig {
                filters: cout,
                kernel,
                padding: Padding::Same,
                ..Default::default()
            };
            let conv = Conv2d::new(0, shape, cfg, Activation::Linear, &mut rng).unwrap();
            let geo = conv.geo;
            assert!(ImplicitGemm::applies(&geo, 1), "{shape} {kernel:?}");
            let (kh, kw, cin) = (kernel[0], kernel[1], shape.c);
            let kg = kh * kw * cin;
            let w = rand(&mut rng, kg * cout);
            let mut imp = ImplicitGemm::default();
            // A larger batch first, with non-finite inputs and gradients left in its rows.
            let big = 4;
            let mut x_big = rand(&mut rng, big * shape.len());
            x_big[2 * shape.len() + 1] = f32::INFINITY;
            let mut dz_big = rand(&mut rng, big * geo.output.len());
            dz_big[3 * geo.output.len()] = f32::NAN;
            let mut z_big = vec![0.0; big * geo.output.len()];
            imp.forward(&geo, &x_big, &w, &mut z_big, big);
            imp.load_output_grad(&geo, &dz_big, big);
            let batch = 2;
            let x = rand(&mut rng, batch * shape.len());
            let dz = rand(&mut rng, batch * geo.output.len());
            let mut z = vec![0.0; batch * geo.output.len()];
            imp.forward(&geo, &x, &w, &mut z, batch);
            imp.load_output_grad(&geo, &dz, batch);
            let mut gw = vec![0.0; kg * cout];
            imp.weight_grad(&geo, &mut gw, batch);
            let mut dx = vec![f32::NAN; x.len()];
            imp.input_grad(&geo, &w, &mut dx, batch);
            // The definition, tap by tap.
            let (o, i) = (geo.output, geo.input);
            let mut want_z = vec![0.0f64; z.len()];
            let mut want_gw = vec![0.0f64; gw.len()];
            let mut want_dx = vec![0.0f64; dx.len()];
            for b in 0..batch {
                for oy in 0..o.h {
                    for ox in 0..o.w {
                        let r = (b * o.h + oy) * o.w + ox;
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let Some((iy, ix)) = geo.source(oy, ox, ky, kx) else {
                                    continue;
                                };
                                for ci in 0..cin {
                                    let xi = b * i.len() + (iy * i.w + ix) * cin + ci;
                                    let wr = ((ky * kw + kx) * cin + ci) * cout;
                                    for co in 0..cout {
                                        want_z[r * cout + co] += x[xi] as f64 * w[wr + co] as f64;
                                        want_gw[wr + co] += x[xi] as f64 * dz[r * cout + co] as f64;
                                        want_dx[xi] += dz[r * cout + co] as f64 * w[wr + co] as f64;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            for (name, got, want) in [("z", &z, &want_z), ("dW", &gw, &want_gw), ("dx", &dx, &want_dx)] {
                for (j, (&g, &e)) in got.iter().zip(want.iter()).enumerate() {
                    assert!(
                        (g as f64 - e).abs() < 1e-4,
                        "{shape} {kernel:?} {name}[{j}]: {g} vs {e}"
                    );
                }
            }
        }
    }
}
