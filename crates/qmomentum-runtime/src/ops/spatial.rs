//! What the image ops (convolution, pooling) share: reading and checking a window's geometry,
//! checking that the input is an image of the expected shape, and the size limits.
//!
//! # Limits
//! Every dimension (height, width, channels, kernel, stride, dilation, padding, groups) is at
//! most [`MAX_DIM`]. A dense layer's output and work are bounded by its weights, which the file
//! must hold; an image op can multiply both without weights (padding, dilation, many
//! positions), so the model bounds them: over all layers, the activation values per sample stay
//! below [`VALUE_FACTOR`] times the model's size, and the multiply-adds (or comparisons) per
//! sample below [`MAC_FACTOR`] times it, where the model's size is `input.size` plus the bytes
//! of its tensors. A workspace row, and so every allocation made for a model, is then a small
//! multiple of the file plus one input sample, and a hostile header cannot ask for more.

use crate::error::Error;
use crate::format::{Fields, MAX_DIM};
use crate::kernels::Window;

use super::ActSpec;

/// Activation values per sample, over all layers, per byte of the model's size.
pub const VALUE_FACTOR: u128 = 256;

/// Multiply-adds per sample, over all layers, per byte of the model's size.
pub const MAC_FACTOR: u128 = 1 << 16;

/// Checks that every value of `layers[i].key` is in `[min, MAX_DIM]`.
pub(super) fn check_dims<const N: usize>(i: usize, key: &str, v: [usize; N], min: usize) -> Result<(), Error> {
    if v.iter().all(|&d| (min..=MAX_DIM).contains(&d)) {
        Ok(())
    } else {
        let what = if N == 1 { "the value" } else { "every value" };
        let shown = if N == 1 { v[0].to_string() } else { format!("{v:?}") };
        Err(Error::field(
            format!("layers[{i}].{key}"),
            format!("{shown}: {what} must be in [{min}, {MAX_DIM}]"),
        ))
    }
}

/// Checks a window's numbers and returns the output's `[oh, ow]`: every dimension in range,
/// each padding below the kernel extent on its axis, and an extent that fits the padded input.
pub(super) fn check_window(i: usize, win: &Window) -> Result<[usize; 2], Error> {
    check_dims(i, "in_shape", win.in_shape, 1)?;
    check_dims(i, "kernel", win.kernel, 1)?;
    check_dims(i, "stride", win.stride, 1)?;
    check_dims(i, "dilation", win.dilation, 1)?;
    check_dims(i, "padding", win.padding, 0)?;
    // With every value at most 2^16 nothing below overflows.
    let extent = win
        .extent()
        .ok_or(Error::Internal("window extent overflows after the range checks"))?;
    let [top, left, bottom, right] = win.padding;
    for (side, pad, axis) in [
        ("top", top, 0),
        ("left", left, 1),
        ("bottom", bottom, 0),
        ("right", right, 1),
    ] {
        if pad >= extent[axis] {
            return Err(Error::field(
                format!("layers[{i}].padding"),
                format!(
                    "{:?}: {side} {pad} is not below the kernel extent {} (kernel {:?}, dilation {:?})",
                    win.padding, extent[axis], win.kernel, win.dilation
                ),
            ));
        }
    }
    win.out_hw().ok_or_else(|| {
        let padded = win.padded_hw().unwrap_or([usize::MAX; 2]);
        Error::field(
            format!("layers[{i}].kernel"),
            format!(
                "extent {extent:?} (kernel {:?}, dilation {:?}) is larger than the padded input {padded:?} (in_shape {:?}, padding {:?})",
                win.kernel, win.dilation, win.in_shape, win.padding
            ),
        )
    })
}

/// Checks that layer `i` (of kind `kind`) reading an image of shape `in_shape` gets one: u8,
/// shaped, and of that very shape.
pub(super) fn check_input(i: usize, kind: &str, in_shape: [usize; 3], input: &ActSpec) -> Result<(), Error> {
    if input.bits {
        return Err(Error::layer(i, format!("{kind} reads u8 but gets {}", input.desc)));
    }
    check_shape(i, kind, in_shape, input)
}

/// Checks that layer `i` (of kind `kind`) reading a bit image of shape `in_shape` gets one:
/// sign bits, shaped (a bit image: see `kernels::bitimage`), and of that very shape.
pub(super) fn check_bit_input(i: usize, kind: &str, in_shape: [usize; 3], input: &ActSpec) -> Result<(), Error> {
    if !input.bits {
        return Err(Error::layer(
            i,
            format!("{kind} reads sign bits but gets {}", input.desc),
        ));
    }
    check_shape(i, kind, in_shape, input)?;
    // A binarized model input is packed flat (`⌈size/64⌉` words), not as a bit image: the two
    // layouts differ unless every pixel fills whole words.
    let [h, w, c] = in_shape;
    if input.size != h * w * 64 * crate::kernels::bitimage::words(c) {
        return Err(Error::layer(
            i,
            format!(
                "{kind} reads a bit image ({} words per pixel) but {} is {} packed bits",
                crate::kernels::bitimage::words(c),
                input.desc,
                input.size
            ),
        ));
    }
    Ok(())
}

fn check_shape(i: usize, kind: &str, in_shape: [usize; 3], input: &ActSpec) -> Result<(), Error> {
    match input.shape {
        None => Err(Error::field(
            format!("layers[{i}].in_shape"),
            format!(
                "{kind} needs an [h, w, c] input, but {} has no shape{}",
                input.desc,
                if input.desc == "input.size" {
                    " (set input.shape)"
                } else {
                    ""
                }
            ),
        )),
        Some(shape) if shape != in_shape => Err(Error::field(
            format!("layers[{i}].in_shape"),
            format!("{in_shape:?} does not match {} {shape:?}", input.shape_desc),
        )),
        Some(_) => Ok(()),
    }
}

/// Reads the `[kh, kw]`, `[sh, sw]` and (when `padded`) `[top, left, bottom, right]` of a
/// window over `in_shape`; the dilation is 1 and, without `padded`, the padding 0.
pub(super) fn read_window(f: &mut Fields<'_>, in_shape: [usize; 3], padded: bool) -> Result<Window, Error> {
    Ok(Window {
        in_shape,
        kernel: f.sizes("kernel")?,
        stride: f.sizes("stride")?,
        padding: if padded { f.sizes("padding")? } else { [0; 4] },
        dilation: [1, 1],
    })
}

/// Reads a convolution's `in_shape`, `out`, `kernel`, `stride`, `padding` and `dilation`:
/// `(window, out)` (shared by `conv2d_i8` and `conv2d_bin`).
pub(super) fn read_conv_window(f: &mut Fields<'_>) -> Result<(Window, usize), Error> {
    let in_shape = f.sizes("in_shape")?;
    let out = f.size("out")?;
    let w = Window {
        in_shape,
        kernel: f.sizes("kernel")?,
        stride: f.sizes("stride")?,
        padding: f.sizes("padding")?,
        dilation: f.sizes("dilation")?,
    };
    Ok((w, out))
}

/// Writes what [`read_conv_window`] reads, in the same order.
pub(super) fn write_conv_window(doc: &mut serde_json::Map<String, serde_json::Value>, w: &Window, out: usize) {
    doc.insert("in_shape".into(), serde_json::json!(w.in_shape));
    doc.insert("out".into(), serde_json::json!(out));
    doc.insert("kernel".into(), serde_json::json!(w.kernel));
    doc.insert("stride".into(), serde_json::json!(w.stride));
    doc.insert("padding".into(), serde_json::json!(w.padding));
    doc.insert("dilation".into(), serde_json::json!(w.dilation));
}

/// `a·b·…` in u128 (image sizes and work counts; cannot overflow for dimensions ≤ 2^16).
pub(super) fn product(v: &[usize]) -> u128 {
    v.iter().map(|&d| d as u128).product()
}

/// The window fields of a pooling layer in the model file (`padding` only where the op has it).
pub(crate) fn write_window(doc: &mut serde_json::Map<String, serde_json::Value>, w: &Window, padding: bool) {
    doc.insert("in_shape".into(), serde_json::json!(w.in_shape));
    doc.insert("kernel".into(), serde_json::json!(w.kernel));
    doc.insert("stride".into(), serde_json::json!(w.stride));
    if padding {
        doc.insert("padding".into(), serde_json::json!(w.padding));
    }
}
