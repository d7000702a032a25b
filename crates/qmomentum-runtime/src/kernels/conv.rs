//! Convolution geometry and the im2col gather that turns a convolution into the int8 GEMM of
//! [`super::dense_i8`].
//!
//! Samples are NHWC u8 (`[h, w, c]`, channel fastest). Output position `(oy, ox)` reads input
//! rows `iy = oy·sh − top + ky·dh` and columns `ix = ox·sw − left + kx·dw`; a position outside
//! the input is *padding* and reads the input zero point `z_in`, so that it contributes
//! `(z_in − z_in)·W = 0` to the accumulator, exactly as the format defines it.

/// The window of a 2-D convolution or pooling layer over one NHWC sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window {
    /// `[h, w, c]` of the input sample.
    pub in_shape: [usize; 3],
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// `[sh, sw]`.
    pub stride: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub padding: [usize; 4],
    /// `[dh, dw]` (1 = adjacent taps).
    pub dilation: [usize; 2],
}

impl Window {
    /// The input rows and columns one output position spans, `d·(k − 1) + 1` per axis
    /// (`None` on overflow).
    pub fn extent(&self) -> Option<[usize; 2]> {
        let ext = |k: usize, d: usize| k.checked_sub(1)?.checked_mul(d)?.checked_add(1);
        Some([
            ext(self.kernel[0], self.dilation[0])?,
            ext(self.kernel[1], self.dilation[1])?,
        ])
    }

    /// The padded input, `[h + top + bottom, w + left + right]` (`None` on overflow).
    pub fn padded_hw(&self) -> Option<[usize; 2]> {
        let [h, w, _] = self.in_shape;
        let [top, left, bottom, right] = self.padding;
        Some([
            h.checked_add(top)?.checked_add(bottom)?,
            w.checked_add(left)?.checked_add(right)?,
        ])
    }

    /// `[oh, ow]` with `oh = (h + top + bottom − extent_h)/sh + 1` (floor), the same for `ow`;
    /// `None` when the extent exceeds the padded input, a stride is 0 or a size overflows.
    pub fn out_hw(&self) -> Option<[usize; 2]> {
        let [eh, ew] = self.extent()?;
        let [ph, pw] = self.padded_hw()?;
        let [sh, sw] = self.stride;
        Some([
            ph.checked_sub(eh)?.checked_div(sh)? + 1,
            pw.checked_sub(ew)?.checked_div(sw)? + 1,
        ])
    }

    /// `[oh, ow, c]`: the output of a pooling window (channels unchanged).
    pub fn pooled_shape(&self) -> Option<[usize; 3]> {
        let [oh, ow] = self.out_hw()?;
        Some([oh, ow, self.in_shape[2]])
    }
}

/// A convolution: its window, output channels and channel groups.
///
/// Weights are `[out, kh, kw, c/groups]`; output channel `o` belongs to group
/// `g = o / (out/groups)` and reads input channels `g·cg .. (g+1)·cg` with `cg = c/groups`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvGeometry {
    /// Input shape, kernel, stride, padding, dilation.
    pub window: Window,
    /// Output channels (`out`).
    pub out_channels: usize,
    /// Channel groups; divides both `c` and `out` (depthwise: `groups = c`).
    pub groups: usize,
}

impl ConvGeometry {
    /// Input channels per group, `c/groups`.
    pub fn group_in(&self) -> usize {
        self.window.in_shape[2] / self.groups.max(1)
    }

    /// Output channels per group, `out/groups`.
    pub fn group_out(&self) -> usize {
        self.out_channels / self.groups.max(1)
    }

    /// Inputs of one output value (one weight row): `kh·kw·c/groups`.
    pub fn patch(&self) -> usize {
        self.window.kernel[0] * self.window.kernel[1] * self.group_in()
    }
}

/// The row stride of an [`im2col`] buffer for patches of `patch` bytes: at least the patch
/// rounded up to whole 4-byte steps (what the int8 kernels read) plus 15 bytes, so that every
/// short run can move as one 16-byte piece without spilling into the next row.
pub fn col_stride(patch: usize) -> usize {
    (patch + 16).next_multiple_of(16)
}

/// Gathers the input patches of `n` output positions for channel group `group`.
///
/// Positions are numbered across the samples of the block: flat position `r0 + r` is position
/// `p = (r0 + r) mod (oh·ow)` (row-major) of sample `(r0 + r) / (oh·ow)`, whose `h·w·c` bytes
/// start at `x[sample·x_stride]`. The first `kh·kw·cg` bytes of row `r` of `col` (stride
/// `col_stride`, at least [`col_stride`]`(kh·kw·cg)`) receive the patch in weight order,
/// `(ky, kx, ci)` with `ci` fastest: `x[iy, ix, group·cg + ci]`, or `z_in` where `(iy, ix)`
/// lies in the padding. The rest of each row may be overwritten.
///
/// The geometry must be valid ([`Window::out_hw`] is `Some`, `groups` divides `c`); panics
/// (slice bounds) if a buffer is too small.
#[allow(clippy::too_many_arguments)]
#[inline(never)] // a function of its own for `scripts/check-integer-kernels.sh`
pub fn im2col(
    g: &ConvGeometry,
    out_hw: [usize; 2],
    group: usize,
    z_in: u8,
    x: &[u8],
    x_stride: usize,
    r0: usize,
    n: usize,
    col: &mut [u8],
    col_stride: usize,
) {
    let Window {
        in_shape: [h, w, c],
        kernel: [kh, kw],
        stride: [sh, sw],
        padding: [top, left, ..],
        dilation: [dh, dw],
    } = g.window;
    let [oh, ow] = out_hw;
    let positions = oh * ow;
    let cg = g.group_in();
    let c0 = group * cg;
    let run = kw * cg;
    assert!(col_stride >= self::col_stride(kh * run) && col.len() >= n * col_stride);
    let col = &mut col[..n * col_stride];
    // The output columns whose taps all lie inside the image: `ox·sw − left ≥ 0` and
    // `ox·sw − left + (kw − 1)·dw < w`.
    let lo = left.div_ceil(sw);
    let hi = (w + left)
        .checked_sub((kw - 1) * dw + 1)
        .map_or(0, |last| last / sw + 1);
    // Interior kernel rows are one run when the taps are adjacent and take every channel.
    let contiguous = dw == 1 && cg == c;
    // Positions are taken a segment of one output row at a time, kernel row by kernel row:
    // the interior loop only moves bytes and steps both offsets. Writes go in increasing order
    // within each patch, so a 16-byte move that spills past a short run only touches bytes
    // written after it (or the slack at the end of the row).
    let (mut sample, mut oy, mut ox) = (r0 / positions, (r0 % positions) / ow, r0 % ow);
    let mut r = 0;
    while r < n {
        let seg = (ow - ox).min(n - r);
        let base = sample * x_stride;
        let y0 = (oy * sh) as isize - top as isize;
        // Segment positions `j` with `ox + j` in [lo, hi) are interior.
        let (j_lo, j_hi) = (lo.saturating_sub(ox).min(seg), hi.saturating_sub(ox).min(seg));
        let (j_lo, j_hi) = (j_lo, j_hi.max(j_lo));
        for ky in 0..kh {
            let d0 = r * col_stride + ky * run;
            // Signed: the tap may lie in the padding. Every value is below 2^33 (dims are at
            // most 2^16), far inside isize.
            let iy = y0 + (ky * dh) as isize;
            if iy < 0 || iy >= h as isize {
                for j in 0..seg {
                    fill_run(col, d0 + j * col_stride, run, z_in);
                }
                continue;
            }
            let row = base + iy as usize * w * c;
            let edge = |j: usize, col: &mut [u8]| {
                let x0 = ((ox + j) * sw) as isize - left as isize;
                let d = d0 + j * col_stride;
                if contiguous {
                    // Taps `a..b` are inside: padding, one run, padding. Each piece may spill
                    // only into the ones after it.
                    let a = (-x0).clamp(0, kw as isize) as usize;
                    let b = (w as isize - x0).clamp(a as isize, kw as isize) as usize;
                    if a > 0 {
                        fill_run(col, d, a * c, z_in);
                    }
                    if b > a {
                        let src = row + (x0 + a as isize) as usize * c;
                        copy_run(col, d + a * c, x, src, (b - a) * c);
                    }
                    if b < kw {
                        fill_run(col, d + b * c, (kw - b) * c, z_in);
                    }
                    return;
                }
                for kx in 0..kw {
                    let ix = x0 + (kx * dw) as isize;
                    if ix < 0 || ix >= w as isize {
                        fill_run(col, d + kx * cg, cg, z_in);
                    } else {
                        copy_run(col, d + kx * cg, x, row + ix as usize * c + c0, cg);
                    }
                }
            };
            for j in (0..j_lo).chain(j_hi..seg) {
                edge(j, col);
            }
            if contiguous {
                let mut d = d0 + j_lo * col_stride;
                let mut src = row + ((ox + j_lo) * sw - left) * c;
                for _ in j_lo..j_hi {
                    copy_run(col, d, x, src, run);
                    d += col_stride;
                    src += sw * c;
                }
            } else {
                for j in j_lo..j_hi {
                    edge(j, col);
                }
            }
        }
        r += seg;
        ox += seg;
        if ox == ow {
            ox = 0;
            oy += 1;
            if oy == oh {
                oy = 0;
                sample += 1;
            }
        }
    }
}

/// `dst[d..d + n] = src[s..s + n]`. A run of at most 16 bytes moves as one 16-byte piece when
/// both slices have 16 bytes there (the bytes after the run in `dst` are then overwritten).
#[inline(always)]
fn copy_run(dst: &mut [u8], d: usize, src: &[u8], s: usize, n: usize) {
    if n <= 16 {
        if let (Some(to), Some(from)) = (dst.get_mut(d..d + 16), src.get(s..s + 16)) {
            to.copy_from_slice(from);
            return;
        }
    }
    copy(&mut dst[d..d + n], &src[s..s + n]);
}

/// `dst[d..d + n] = z`, as one 16-byte piece for short runs when `dst` has room (the bytes
/// after the run are then overwritten).
#[inline(always)]
fn fill_run(dst: &mut [u8], d: usize, n: usize, z: u8) {
    if n <= 16 {
        if let Some(to) = dst.get_mut(d..d + 16) {
            to.copy_from_slice(&[z; 16]);
            return;
        }
    }
    for b in &mut dst[d..d + n] {
        *b = z;
    }
}

/// `dst.copy_from_slice(src)` for the short runs of a patch (a few bytes to a few hundred) in
/// fixed-size pieces, which compile to plain moves: a `memcpy` call per run cost more than the
/// copy itself (a third of cnn-small's time went to `im2col` and `memmove`).
#[inline(always)]
fn copy(dst: &mut [u8], src: &[u8]) {
    fn piece<const N: usize>(dst: &mut [u8], src: &[u8], at: usize) {
        dst[at..at + N].copy_from_slice(&src[at..at + N]);
    }
    let n = dst.len();
    assert_eq!(n, src.len(), "im2col copy lengths");
    if n >= 16 {
        // Whole 16-byte pieces, then one last piece that overlaps the previous one.
        let mut at = 0;
        while at + 16 <= n {
            piece::<16>(dst, src, at);
            at += 16;
        }
        if at < n {
            piece::<16>(dst, src, n - 16);
        }
        return;
    }
    let mut at = 0;
    if n & 8 != 0 {
        piece::<8>(dst, src, at);
        at += 8;
    }
    if n & 4 != 0 {
        piece::<4>(dst, src, at);
        at += 4;
    }
    if n & 2 != 0 {
        piece::<2>(dst, src, at);
        at += 2;
    }
    if n & 1 != 0 {
        dst[at] = src[at];
    }
}
