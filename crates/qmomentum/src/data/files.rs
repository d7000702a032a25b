//! Users' own files as model inputs: PNG and JPEG images, folders of them, and `.npy` arrays.
//!
//! The models are trained on Fashion-MNIST: 28×28 u8 grayscale, a light object on a black
//! background (0 = background), one row of 784 bytes per sample. The float model sees
//! `pixel / 255`, the integer runtime the u8 itself. [`load_inputs`] brings other files to that
//! form and says, in [`Inputs::notes`], every conversion it made, so that a surprising prediction
//! can be traced to what the model was actually shown.
//!
//! Images, in this order (which follows how Fashion-MNIST was made from product photos, Xiao et
//! al. 2017: fit the longer side, centre, negate, grayscale):
//!
//! 1. **Decoding** with the `image` crate (PNG, JPEG; 8- or 16-bit; gray, gray+alpha, RGB, RGBA),
//!    refusing images wider or taller than [`MAX_IMAGE_SIDE`] or needing more than
//!    [`MAX_DECODED_BYTES`] once decoded, before any pixel buffer is allocated. An EXIF
//!    orientation (phone photos) is applied, so the picture stands as it is seen in a viewer.
//! 2. **Grayscale**: ITU-R BT.601 luma `0.299 R + 0.587 G + 0.114 B` on the stored values (what
//!    PIL's `convert("L")` computes; the `image` crate's own conversion uses BT.709 weights).
//!    Alpha is composited on black (`luma · alpha`), black being the training background, so a
//!    cut-out product on a transparent background comes out as a light object on black. 16-bit
//!    values become `round(v · 255 / 65535)`. 8-bit gray images are taken as they are.
//! 3. **Inversion** ([`Invert`]): by default when the mean of the border pixels is above 127, i.e.
//!    the background is light (a product photo on white), the pixels become `255 − v`.
//! 4. **Size**: the image is scaled so that it fits `height × width` with its aspect ratio kept
//!    (the longer side fills the frame), with the triangle filter of `image` (bilinear, widened
//!    when shrinking so that every source pixel is averaged in), then centred on a frame filled
//!    with the image's background (the mean of its border after step 3). An image that already
//!    has the target size is not resampled at all: its pixels come through exactly. Unlike the
//!    Fashion-MNIST pipeline, the object is not cropped out of a large margin and not sharpened.
//!
//! Arrays (`.npy`) are taken to be model-ready data laid out like the training set: uint8
//! values are used as they are; float32/float64 values must lie in `[0, 1]` (pixel / 255) and are
//! turned back into `round(x · 255)`. Accepted shapes for `H × W` inputs are `[H, W]` (one
//! sample), `[N, H, W]`, `[N, H·W]` and `[N, H, W, 1]`; Fortran-ordered arrays are reordered.
//! Only [`Invert::Always`] changes arrays (the automatic choice is for photos).
//!
//! The `.npy` header is parsed here rather than with a crate: the format is a 10-byte prefix and
//! a small Python dict literal, and the maintained crate (`npyz` 0.9) multiplies the header's
//! shape without overflow checks (a hostile header panics in a debug build) and pulls in a
//! general Python-literal parser with big integers, where three dtypes and exact byte counts
//! in every error message are all this needs.

use crate::error::{Error, Result};
use image::imageops::FilterType;
use image::metadata::Orientation;
use image::{ColorType, DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, Luma};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Largest width or height of an image we decode (a header may claim up to 2^31).
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Largest decoded image in bytes (512 MiB: a 16384×8192 RGBA photo).
pub const MAX_DECODED_BYTES: u64 = 512 << 20;
/// Largest target height or width accepted in [`ImageOptions`].
pub const MAX_TARGET_SIDE: usize = 4096;
/// Largest `.npy` header (numpy itself refuses headers over 10 000 bytes by default).
const MAX_NPY_HEADER: usize = 1 << 16;

/// When to invert images (`v → 255 − v`) so that the background is dark like the training data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Invert {
    /// Invert an image whose border pixels average above 127 (a light background). Arrays are
    /// never inverted automatically.
    #[default]
    Auto,
    /// Invert every image and every array.
    Always,
    /// Never invert.
    Never,
}

impl std::str::FromStr for Invert {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Invert::Auto),
            "always" | "yes" | "true" => Ok(Invert::Always),
            "never" | "no" | "false" => Ok(Invert::Never),
            _ => Err(Error::config("invert", s, "expected auto, always or never")),
        }
    }
}

/// The input size the model expects and the inversion rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageOptions {
    /// Rows of a sample (28 for Fashion-MNIST).
    pub height: usize,
    /// Columns of a sample (28 for Fashion-MNIST).
    pub width: usize,
    /// When to invert.
    pub invert: Invert,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            height: 28,
            width: 28,
            invert: Invert::Auto,
        }
    }
}

/// Samples ready for a model: u8 pixels laid out like the training data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inputs {
    /// `len() × features` pixels, one row per sample, row-major.
    pub rows: Vec<u8>,
    /// One name per sample: the image's path, or `path[i]` for sample `i` of an array.
    pub names: Vec<String>,
    /// Every conversion applied, one line per file (or folder) it concerns; empty when the
    /// files were used exactly as they are.
    pub notes: Vec<String>,
    /// Values per sample (`height · width`).
    pub features: usize,
}

impl Inputs {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.names.len()
    }
    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
    /// The pixels of sample `i`.
    pub fn row(&self, i: usize) -> &[u8] {
        &self.rows[i * self.features..(i + 1) * self.features]
    }
}

/// Load images, folders of images (`.png`, `.jpg`, `.jpeg`, sorted by name, not recursive) and
/// `.npy` arrays, in the order given, as `opts.height × opts.width` u8 samples.
pub fn load_inputs(paths: &[PathBuf], opts: &ImageOptions) -> Result<Inputs> {
    for (field, v) in [("height", opts.height), ("width", opts.width)] {
        if v == 0 || v > MAX_TARGET_SIDE {
            return Err(Error::config(
                field,
                v,
                format!("must be between 1 and {MAX_TARGET_SIDE}"),
            ));
        }
    }
    if paths.is_empty() {
        return Err(Error::config(
            "inputs",
            "(none)",
            "give at least one image, folder or .npy file",
        ));
    }
    let mut out = Inputs {
        features: opts.height * opts.width,
        ..Inputs::default()
    };
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            for image in list_folder(path, &mut out.notes)? {
                load_image(&image, opts, &mut out)?;
            }
        } else if has_extension(path, &["npy"]) {
            load_npy(path, opts, &mut out)?;
        } else {
            load_image(path, opts, &mut out)?;
        }
    }
    Ok(out)
}

fn has_extension(path: &Path, exts: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// The images of a folder, sorted by file name; the other entries are named in a note.
fn list_folder(dir: &Path, notes: &mut Vec<String>) -> Result<Vec<PathBuf>> {
    let mut images = Vec::new();
    let mut skipped = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if path.is_file() && has_extension(&path, &["png", "jpg", "jpeg"]) {
            images.push(path);
        } else {
            let mut name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                name.push('/');
            }
            skipped.push(name);
        }
    }
    images.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    skipped.sort();
    if images.is_empty() {
        let held = if skipped.is_empty() {
            "it is empty".to_string()
        } else {
            format!("it holds only {}", name_list(&skipped))
        };
        return Err(Error::data(
            dir,
            format!("no .png, .jpg or .jpeg file in this folder ({held})"),
        ));
    }
    if !skipped.is_empty() {
        notes.push(format!(
            "{}: skipped {} entr{} that {} not .png/.jpg/.jpeg: {}",
            dir.display(),
            skipped.len(),
            if skipped.len() == 1 { "y" } else { "ies" },
            if skipped.len() == 1 { "is" } else { "are" },
            name_list(&skipped)
        ));
    }
    Ok(images)
}

/// At most ten names, then how many more.
fn name_list(names: &[String]) -> String {
    let mut s = names.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 10 {
        let _ = write!(s, " and {} more", names.len() - 10);
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Images

fn color_name(c: ColorType) -> String {
    match c {
        ColorType::L8 => "8-bit gray".into(),
        ColorType::La8 => "8-bit gray+alpha".into(),
        ColorType::Rgb8 => "8-bit RGB".into(),
        ColorType::Rgba8 => "8-bit RGBA".into(),
        ColorType::L16 => "16-bit gray".into(),
        ColorType::La16 => "16-bit gray+alpha".into(),
        ColorType::Rgb16 => "16-bit RGB".into(),
        ColorType::Rgba16 => "16-bit RGBA".into(),
        _ => "other".into(),
    }
}

/// A decoder's complaint in words: the `image` crate's messages embed Rust debug text (chunk type
/// structs, quoted strings), which a user should not see; keep its plain words, drop the rest.
fn decode_reason(e: &image::ImageError) -> String {
    let text = e.to_string();
    // "Format error decoding Png: CRC error: expected … while decoding ChunkType { … } chunk."
    let text = text.split(" while decoding").next().unwrap_or(&text);
    let text = text
        .trim_start_matches("Format error decoding Png: ")
        .trim_start_matches("Format error decoding Jpeg: ")
        .replace('"', "");
    if text.contains('{') || text.contains('}') || text.contains("\\u{") {
        "the file is corrupt or not a valid image".to_string()
    } else {
        format!("the file is corrupt ({})", text.trim_end_matches('.'))
    }
}

/// Decode, convert and append one image to `out`.
fn load_image(path: &Path, opts: &ImageOptions, out: &mut Inputs) -> Result<()> {
    let mut reader = ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let kind = match reader.format() {
        Some(ImageFormat::Png) => "PNG",
        Some(ImageFormat::Jpeg) => "JPEG",
        Some(other) => {
            return Err(Error::data(
                path,
                format!(
                    "{} images are not supported (PNG or JPEG, or a .npy array)",
                    other
                        .extensions_str()
                        .first()
                        .copied()
                        .unwrap_or("these")
                        .to_uppercase()
                ),
            ))
        }
        None => {
            return Err(Error::data(
                path,
                "not a PNG or JPEG image (unrecognised content), nor named .npy",
            ))
        }
    };
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits);
    let bad =
        |e: image::ImageError| Error::data(path, format!("cannot decode the {kind} image: {}", decode_reason(&e)));
    let mut decoder = reader.into_decoder().map_err(bad)?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 || w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
        return Err(Error::data(
            path,
            format!("{w}×{h} image: width and height must be between 1 and {MAX_IMAGE_SIDE}"),
        ));
    }
    let color = decoder.color_type();
    if decoder.total_bytes() > MAX_DECODED_BYTES {
        return Err(Error::data(
            path,
            format!(
                "{w}×{h} {} image would need {} bytes decoded, above the limit of {MAX_DECODED_BYTES}",
                color_name(color),
                decoder.total_bytes()
            ),
        ));
    }
    // A broken EXIF block does not make the picture unusable: it is then shown unrotated.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(bad)?;
    let mut steps: Vec<String> = Vec::new();
    if orientation != Orientation::NoTransforms {
        img.apply_orientation(orientation);
        steps.push(format!("turned as its EXIF orientation says ({orientation:?})"));
    }
    let (w, h) = (img.width() as usize, img.height() as usize);
    match color {
        ColorType::L8 => {}
        ColorType::L16 => steps.push("16-bit → 8-bit (round(v·255/65535))".into()),
        ColorType::La8 | ColorType::La16 => steps.push("alpha composited on black (gray · alpha)".into()),
        ColorType::Rgb8 | ColorType::Rgb16 => steps.push(BT601.into()),
        ColorType::Rgba8 | ColorType::Rgba16 => {
            steps.push(format!("{BT601}, alpha composited on black (luma · alpha)"))
        }
        other => steps.push(format!("{other:?} → 16-bit RGBA → {BT601}, alpha composited on black")),
    }
    let mut gray = to_gray(img);
    if gray.len() != w * h {
        return Err(Error::data(path, "decoded pixel count does not match the image size"));
    }
    let border = border_mean(&gray, w, h);
    let invert = match opts.invert {
        Invert::Auto => border > 127.0,
        Invert::Always => true,
        Invert::Never => false,
    };
    let mut background = border;
    if invert {
        gray.iter_mut().for_each(|v| *v = 255 - *v);
        background = 255.0 - border;
        steps.push(match opts.invert {
            Invert::Auto => format!(
                "inverted (border mean {border:.1} > 127: a light background; the training images have a dark one)"
            ),
            _ => "inverted (255 − v) as requested".into(),
        });
    }
    let background = background.round().clamp(0.0, 255.0) as u8;
    let framed = fit(gray, w, h, opts, background, &mut steps)
        .ok_or_else(|| Error::data(path, "decoded pixel count does not match the image size"))?;
    out.rows.extend_from_slice(&framed);
    out.names.push(path.display().to_string());
    if !steps.is_empty() {
        out.notes.push(format!(
            "{}: {w}×{h} {kind} {} → {}",
            path.display(),
            color_name(color),
            steps.join("; ")
        ));
    }
    Ok(())
}

const BT601: &str = "grayscale (ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B)";

/// One gray byte per pixel: BT.601 luma of the colour channels times alpha (composited on
/// black), rounded. 8-bit gray comes through untouched.
fn to_gray(img: DynamicImage) -> Vec<u8> {
    match img {
        DynamicImage::ImageLuma8(b) => b.into_raw(),
        DynamicImage::ImageLumaA8(b) => luma_of(b.as_raw(), 2, 255.0),
        DynamicImage::ImageRgb8(b) => luma_of(b.as_raw(), 3, 255.0),
        DynamicImage::ImageRgba8(b) => luma_of(b.as_raw(), 4, 255.0),
        DynamicImage::ImageLuma16(b) => luma_of(b.as_raw(), 1, 65535.0),
        DynamicImage::ImageLumaA16(b) => luma_of(b.as_raw(), 2, 65535.0),
        DynamicImage::ImageRgb16(b) => luma_of(b.as_raw(), 3, 65535.0),
        DynamicImage::ImageRgba16(b) => luma_of(b.as_raw(), 4, 65535.0),
        // Float images are not produced by the PNG and JPEG decoders.
        other => luma_of(other.to_rgba16().as_raw(), 4, 65535.0),
    }
}

/// `samples` holds `channels` values per pixel (gray, gray+alpha, RGB or RGBA), each in
/// `0..=max`.
fn luma_of<T: Copy + Into<f64>>(samples: &[T], channels: usize, max: f64) -> Vec<u8> {
    samples
        .chunks_exact(channels)
        .map(|p| {
            let v = |i: usize| p[i].into() / max;
            let (y, alpha) = match channels {
                1 => (v(0), 1.0),
                2 => (v(0), v(1)),
                3 => (0.299 * v(0) + 0.587 * v(1) + 0.114 * v(2), 1.0),
                _ => (0.299 * v(0) + 0.587 * v(1) + 0.114 * v(2), v(3)),
            };
            (y * alpha * 255.0).round().clamp(0.0, 255.0) as u8
        })
        .collect()
}

/// Mean of the pixels of the first and last rows and columns.
fn border_mean(gray: &[u8], w: usize, h: usize) -> f64 {
    let (mut sum, mut n) = (0u64, 0u64);
    for y in 0..h {
        let row = &gray[y * w..(y + 1) * w];
        if y == 0 || y + 1 == h {
            sum += row.iter().map(|&v| v as u64).sum::<u64>();
            n += w as u64;
        } else {
            sum += row[0] as u64;
            n += 1;
            if w > 1 {
                sum += row[w - 1] as u64;
                n += 1;
            }
        }
    }
    sum as f64 / n.max(1) as f64
}

/// Scale `gray` (`w × h`) to fit `opts.width × opts.height` with its aspect ratio kept, then
/// centre it on a frame of `background`. `None` if `gray` does not hold `w × h` pixels.
fn fit(
    gray: Vec<u8>,
    w: usize,
    h: usize,
    opts: &ImageOptions,
    background: u8,
    steps: &mut Vec<String>,
) -> Option<Vec<u8>> {
    let (tw, th) = (opts.width, opts.height);
    // The longer side (relative to the frame) fills the frame; the other is rounded, at least 1.
    let (nw, nh) = if (w as u64) * (th as u64) >= (h as u64) * (tw as u64) {
        let nh = ((2 * h as u64 * tw as u64 + w as u64) / (2 * w as u64)) as usize;
        (tw, nh.clamp(1, th))
    } else {
        let nw = ((2 * w as u64 * th as u64 + h as u64) / (2 * h as u64)) as usize;
        (nw.clamp(1, tw), th)
    };
    let scaled = if (nw, nh) == (w, h) {
        if gray.len() != w * h {
            return None;
        }
        gray
    } else {
        let buf = image::ImageBuffer::<Luma<u8>, Vec<u8>>::from_raw(w as u32, h as u32, gray)?;
        let resized = image::imageops::resize(&buf, nw as u32, nh as u32, FilterType::Triangle);
        steps.push(format!(
            "resized to {nw}×{nh} (triangle filter: bilinear, averaging every source pixel when shrinking)"
        ));
        resized.into_raw()
    };
    if (nw, nh) == (tw, th) {
        return Some(scaled);
    }
    let (x0, y0) = ((tw - nw) / 2, (th - nh) / 2);
    let mut frame = vec![background; tw * th];
    for (y, row) in scaled.chunks_exact(nw).enumerate() {
        let start = (y0 + y) * tw + x0;
        frame[start..start + nw].copy_from_slice(row);
    }
    steps.push(format!(
        "centred on a {tw}×{th} frame filled with the background value {background} (aspect ratio kept)"
    ));
    Some(frame)
}

// ---------------------------------------------------------------------------------------------
// .npy arrays

/// The element types accepted in `.npy` files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    U8,
    F32 { big_endian: bool },
    F64 { big_endian: bool },
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::F32 { .. } => 4,
            Dtype::F64 { .. } => 8,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Dtype::U8 => "uint8",
            Dtype::F32 { .. } => "float32",
            Dtype::F64 { .. } => "float64",
        }
    }
    fn from_descr(descr: &str) -> Option<Dtype> {
        let (order, code) = match descr.as_bytes().first() {
            Some(b'<' | b'>' | b'|' | b'=') => descr.split_at(1),
            _ => ("", descr),
        };
        let big_endian = match order {
            ">" => true,
            "=" => cfg!(target_endian = "big"),
            _ => false,
        };
        match (order, code) {
            (_, "u1") => Some(Dtype::U8),
            ("|", _) => None,
            (_, "f4") => Some(Dtype::F32 { big_endian }),
            (_, "f8") => Some(Dtype::F64 { big_endian }),
            _ => None,
        }
    }
    /// Element `k` of `data` as f64 (the caller has checked the length).
    fn get(self, data: &[u8], k: usize) -> f64 {
        let s = self.size();
        let b = &data[k * s..(k + 1) * s];
        let mut a4 = [0u8; 4];
        let mut a8 = [0u8; 8];
        match self {
            Dtype::U8 => b[0] as f64,
            Dtype::F32 { big_endian } => {
                a4.copy_from_slice(b);
                (if big_endian {
                    f32::from_be_bytes(a4)
                } else {
                    f32::from_le_bytes(a4)
                }) as f64
            }
            Dtype::F64 { big_endian } => {
                a8.copy_from_slice(b);
                if big_endian {
                    f64::from_be_bytes(a8)
                } else {
                    f64::from_le_bytes(a8)
                }
            }
        }
    }
}

/// What the header of a `.npy` file says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NpyHeader {
    dtype: Dtype,
    fortran_order: bool,
    shape: Vec<usize>,
    /// Where the data start (prefix + header).
    data_offset: usize,
}

fn shape_str(shape: &[usize]) -> String {
    format!("{shape:?}")
}

/// Parse the prefix and header of `.npy` bytes: magic `\x93NUMPY`, version major/minor, the
/// header length (u16 LE in version 1, u32 LE in versions 2 and 3), then the dict literal.
fn parse_npy_header(bytes: &[u8]) -> std::result::Result<NpyHeader, String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        let got = &bytes[..bytes.len().min(MAGIC.len())];
        return Err(format!(
            "not a .npy file: bad magic {} (expected \\x93NUMPY)",
            got.escape_ascii()
        ));
    }
    if bytes.len() < 10 {
        return Err(format!(
            "truncated .npy prefix: {} bytes, at least 10 needed",
            bytes.len()
        ));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(format!("truncated .npy prefix: {} bytes, 12 needed", bytes.len()));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        _ => {
            return Err(format!(
                "unsupported .npy format version {major}.{minor} (1.0, 2.0 and 3.0 are known)"
            ))
        }
    };
    if len > MAX_NPY_HEADER {
        return Err(format!(
            "header of {len} bytes is implausibly long (limit {MAX_NPY_HEADER})"
        ));
    }
    let end = start + len;
    if bytes.len() < end {
        return Err(format!(
            "truncated header: the file has {} bytes, the header says it ends at byte {end}",
            bytes.len()
        ));
    }
    let text = std::str::from_utf8(&bytes[start..end]).map_err(|_| "the header is not UTF-8 text".to_string())?;
    let mut p = Lit {
        s: text.as_bytes(),
        pos: 0,
        depth: 0,
    };
    let dict = p.value()?;
    p.ws();
    if p.pos != p.s.len() {
        return Err(format!("unexpected text after the header dict at byte {}", p.pos));
    }
    let Py::Dict(entries) = dict else {
        return Err(format!("the header is not a dict: {}", text.trim()));
    };
    let key = |k: &str| {
        entries
            .iter()
            .find(|(name, _)| matches!(name, Py::Str(s) if s == k))
            .map(|(_, v)| v)
            .ok_or_else(|| format!("the header has no '{k}' entry: {}", text.trim()))
    };
    let dtype = match key("descr")? {
        Py::Str(d) => Dtype::from_descr(d).ok_or_else(|| {
            format!(
                "unsupported dtype '{d}' (accepted: uint8 '|u1', float32 '<f4', float64 '<f8'; \
                 convert with arr.astype(numpy.uint8) for pixels 0–255)"
            )
        })?,
        _ => return Err("structured dtypes (records) are not supported: expected uint8, float32 or float64".into()),
    };
    let fortran_order = match key("fortran_order")? {
        Py::Bool(b) => *b,
        _ => return Err("'fortran_order' must be True or False".into()),
    };
    let shape = match key("shape")? {
        Py::Seq(items) => items
            .iter()
            .map(|v| match v {
                Py::Int(n) => usize::try_from(*n).ok(),
                _ => None,
            })
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| "'shape' must be a tuple of non-negative integers".to_string())?,
        _ => return Err("'shape' must be a tuple of non-negative integers".into()),
    };
    Ok(NpyHeader {
        dtype,
        fortran_order,
        shape,
        data_offset: end,
    })
}

/// A value of the Python literals found in `.npy` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Py {
    Str(String),
    Bool(bool),
    Int(u64),
    None,
    Seq(Vec<Py>),
    Dict(Vec<(Py, Py)>),
}

/// A parser of those literals: dicts, tuples, lists, strings, booleans, `None`, non-negative
/// integers (with Python 2's `L` suffix). Nesting is bounded so a hostile header cannot exhaust
/// the stack.
struct Lit<'a> {
    s: &'a [u8],
    pos: usize,
    depth: usize,
}

impl Lit<'_> {
    fn ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.pos).copied()
    }
    fn unexpected(&self) -> String {
        match self.s.get(self.pos) {
            Some(c) => format!("unexpected '{}' at byte {} of the header", c.escape_ascii(), self.pos),
            None => "the header ends in the middle of its dict".to_string(),
        }
    }
    fn value(&mut self) -> std::result::Result<Py, String> {
        match self.peek() {
            Some(b'{') => self.container(b'}', true),
            Some(b'(') => self.container(b')', false),
            Some(b'[') => self.container(b']', false),
            Some(q @ (b'\'' | b'"')) => {
                self.pos += 1;
                let start = self.pos;
                while self.pos < self.s.len() && self.s[self.pos] != q {
                    self.pos += if self.s[self.pos] == b'\\' { 2 } else { 1 };
                }
                if self.pos >= self.s.len() {
                    return Err("unterminated string in the header".into());
                }
                let text = String::from_utf8_lossy(&self.s[start..self.pos]).into_owned();
                self.pos += 1;
                Ok(Py::Str(text))
            }
            Some(c) if c.is_ascii_digit() => {
                let mut n: u64 = 0;
                while let Some(d) = self.s.get(self.pos).filter(|c| c.is_ascii_digit()) {
                    n = n
                        .checked_mul(10)
                        .and_then(|n| n.checked_add((d - b'0') as u64))
                        .ok_or_else(|| format!("integer too large at byte {} of the header", self.pos))?;
                    self.pos += 1;
                }
                if matches!(self.s.get(self.pos), Some(b'L' | b'l')) {
                    self.pos += 1;
                }
                Ok(Py::Int(n))
            }
            Some(c) if c.is_ascii_alphabetic() => {
                let start = self.pos;
                while self
                    .s
                    .get(self.pos)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
                {
                    self.pos += 1;
                }
                match &self.s[start..self.pos] {
                    b"True" => Ok(Py::Bool(true)),
                    b"False" => Ok(Py::Bool(false)),
                    b"None" => Ok(Py::None),
                    w => Err(format!("unexpected word '{}' in the header", w.escape_ascii())),
                }
            }
            _ => Err(self.unexpected()),
        }
    }
    /// A dict (`key: value` pairs) or a sequence, after its opening bracket, up to `close`.
    fn container(&mut self, close: u8, dict: bool) -> std::result::Result<Py, String> {
        self.depth += 1;
        if self.depth > 8 {
            return Err("the header nests too deeply".into());
        }
        self.pos += 1;
        let (mut items, mut pairs) = (Vec::new(), Vec::new());
        loop {
            if self.peek() == Some(close) {
                break;
            }
            let v = self.value()?;
            if dict {
                if self.peek() != Some(b':') {
                    return Err(self.unexpected());
                }
                self.pos += 1;
                pairs.push((v, self.value()?));
            } else {
                items.push(v);
            }
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(c) if c == close => break,
                _ => return Err(self.unexpected()),
            }
        }
        self.pos += 1;
        self.depth -= 1;
        Ok(if dict { Py::Dict(pairs) } else { Py::Seq(items) })
    }
}

/// Samples in an array of `shape` for `h × w` inputs, and whether it is a single `[h, w]` image.
fn samples_in(shape: &[usize], h: usize, w: usize) -> Option<(usize, bool)> {
    match *shape {
        [a, b] if (a, b) == (h, w) => Some((1, true)),
        [n, f] if f == h * w => Some((n, false)),
        [n, a, b] if (a, b) == (h, w) => Some((n, false)),
        [n, a, b, 1] if (a, b) == (h, w) => Some((n, false)),
        _ => None,
    }
}

/// C-order multi-index of flat element `k`.
fn multi_index(shape: &[usize], mut k: usize) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (i, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            idx[i] = k % d;
            k /= d;
        }
    }
    idx
}

/// Read, check and append the samples of one `.npy` file to `out`.
fn load_npy(path: &Path, opts: &ImageOptions, out: &mut Inputs) -> Result<()> {
    // The whole file is read: its real length bounds the allocation, whatever the header claims.
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::data(path, msg);
    let hd = parse_npy_header(&bytes).map_err(bad)?;
    let (h, w) = (opts.height, opts.width);
    let shape = shape_str(&hd.shape);
    let (n, single) = samples_in(&hd.shape, h, w).ok_or_else(|| {
        bad(format!(
            "array of shape {shape} does not hold {h}×{w} images: expected [{h}, {w}] (one image), \
             [N, {h}, {w}], [N, {}] or [N, {h}, {w}, 1]",
            h * w
        ))
    })?;
    if n == 0 {
        return Err(bad(format!("array of shape {shape} holds no samples")));
    }
    let count = hd.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let need = count.and_then(|c| c.checked_mul(hd.dtype.size()));
    let (Some(count), Some(need)) = (count, need) else {
        return Err(bad(format!("shape {shape} is too large to address")));
    };
    let data = &bytes[hd.data_offset..];
    if data.len() != need {
        let what = if data.len() < need {
            "truncated file"
        } else {
            "extra bytes at the end"
        };
        return Err(bad(format!(
            "{what}: shape {shape} of {} needs {need} data bytes after the {}-byte header, the file has {}",
            hd.dtype.name(),
            hd.data_offset,
            data.len()
        )));
    }
    // Element `c` in C order is element `k` of the file: `k = c` for C order, and the Fortran
    // offset (first index fastest) of the same multi-index otherwise, walked with an odometer.
    let mut fortran_strides = vec![1usize; hd.shape.len()];
    for i in 1..hd.shape.len() {
        fortran_strides[i] = fortran_strides[i - 1] * hd.shape[i - 1];
    }
    let mut index = vec![0usize; hd.shape.len()];
    let mut k = 0usize;
    let invert = opts.invert == Invert::Always;
    out.rows.reserve(count);
    for c in 0..count {
        let file_k = if hd.fortran_order { k } else { c };
        let v = match hd.dtype {
            Dtype::U8 => bytes[hd.data_offset + file_k],
            dt => {
                let x = dt.get(data, file_k);
                if !(0.0..=1.0).contains(&x) {
                    return Err(bad(format!(
                        "{} value {x} at index {:?} is outside [0, 1] (float arrays must hold pixel/255; \
                         for 0–255 pixels save uint8)",
                        dt.name(),
                        multi_index(&hd.shape, c)
                    )));
                }
                (x * 255.0).round() as u8
            }
        };
        out.rows.push(if invert { 255 - v } else { v });
        if hd.fortran_order {
            for i in (0..index.len()).rev() {
                index[i] += 1;
                k += fortran_strides[i];
                if index[i] < hd.shape[i] {
                    break;
                }
                k -= fortran_strides[i] * hd.shape[i];
                index[i] = 0;
            }
        }
    }
    if single {
        out.names.push(path.display().to_string());
    } else {
        out.names.extend((0..n).map(|i| format!("{}[{i}]", path.display())));
    }
    let mut steps = Vec::new();
    if hd.fortran_order {
        steps.push("reordered from Fortran (column-major) to C order".to_string());
    }
    if hd.dtype != Dtype::U8 {
        steps.push(format!("{} values in [0, 1] → u8 as round(x·255)", hd.dtype.name()));
    }
    if invert {
        steps.push("inverted (255 − v) as requested".to_string());
    }
    if !steps.is_empty() {
        out.notes.push(format!(
            "{}: {} array {shape} → {n} sample{}: {}",
            path.display(),
            hd.dtype.name(),
            if n == 1 { "" } else { "s" },
            steps.join("; ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, ImageBuffer, Rgb, RgbImage, Rgba};

    /// A fresh folder under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("qmomentum-files-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// `.npy` version 1.0 bytes, the header padded with spaces to a multiple of 64 as numpy does.
    fn npy(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
        let f = if fortran { "True" } else { "False" };
        let mut header = format!("{{'descr': '{descr}', 'fortran_order': {f}, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn load(paths: &[PathBuf]) -> Result<Inputs> {
        load_inputs(paths, &ImageOptions::default())
    }

    fn err(paths: &[PathBuf]) -> String {
        load(paths).expect_err("should fail").to_string()
    }

    /// 56×56 white RGB with a black 28×28 square at rows/columns 14..42: inverted (light border),
    /// halved with the triangle filter. Output column x averages source columns 2x−1..2x+2 with
    /// weights ¼ ¾ ¾ ¼ (/2), so 8..=19 are inside the square (255 after inversion), 0..=5 and
    /// 22..=27 are background (0), and column 7 sees ¼/2 = 1/8 background: 255·7/8 = 223.1.
    #[test]
    fn white_background_photo_is_inverted_and_halved() {
        let dir = TempDir::new("photo");
        let mut img = RgbImage::from_pixel(56, 56, Rgb([255, 255, 255]));
        for y in 14..42 {
            for x in 14..42 {
                img.put_pixel(x, y, Rgb([0, 0, 0]));
            }
        }
        let p = dir.0.join("photo.png");
        img.save(&p).unwrap();
        let got = load(std::slice::from_ref(&p)).unwrap();
        assert_eq!((got.len(), got.features, got.rows.len()), (1, 784, 784));
        let px = |y: usize, x: usize| got.rows[y * 28 + x];
        for i in 0..28 {
            assert_eq!([px(0, i), px(27, i), px(i, 0), px(i, 27)], [0; 4], "border at {i}");
        }
        assert_eq!(px(14, 14), 255);
        assert_eq!((px(8, 8), px(19, 19)), (255, 255));
        assert_eq!((px(5, 14), px(22, 14)), (0, 0));
        assert_eq!(px(14, 7), 223);
        assert_eq!(got.names, vec![p.display().to_string()]);
        let note = &got.notes[0];
        for word in [
            "photo.png",
            "56×56",
            "BT.601",
            "inverted",
            "border mean",
            "resized to 28×28",
            "triangle",
        ] {
            assert!(note.contains(word), "{word} missing from {note}");
        }
    }

    /// A 28×28 8-bit gray image with a dark border is used exactly as stored, with no note.
    #[test]
    fn matching_gray_image_comes_through_unchanged() {
        let dir = TempDir::new("exact");
        let img = GrayImage::from_fn(28, 28, |x, y| Luma([((x * 7 + y * 13) % 128) as u8]));
        let p = dir.0.join("exact.png");
        img.save(&p).unwrap();
        let got = load(&[p]).unwrap();
        assert_eq!(got.rows, img.into_raw());
        assert!(got.notes.is_empty(), "{:?}", got.notes);
    }

    /// (200, 100, 50): 0.299·200 + 0.587·100 + 0.114·50 = 124.2 → 124; with alpha 128 on black:
    /// 124.2 · 128/255 = 62.34 → 62. 16-bit gray 128·257 → 128.
    #[test]
    fn colour_and_alpha_and_16_bit_follow_the_formulas() {
        let dir = TempDir::new("luma");
        let rgb = dir.0.join("rgb.png");
        RgbImage::from_pixel(28, 28, Rgb([200, 100, 50])).save(&rgb).unwrap();
        let rgba = dir.0.join("rgba.png");
        ImageBuffer::from_pixel(28, 28, Rgba([200u8, 100, 50, 128]))
            .save(&rgba)
            .unwrap();
        let deep = dir.0.join("deep.png");
        ImageBuffer::from_pixel(28, 28, Luma([128u16 * 257]))
            .save(&deep)
            .unwrap();
        let opts = ImageOptions {
            invert: Invert::Never,
            ..ImageOptions::default()
        };
        let got = load_inputs(&[rgb, rgba, deep], &opts).unwrap();
        assert_eq!(got.len(), 3);
        assert!(got.row(0).iter().all(|&v| v == 124));
        assert!(got.row(1).iter().all(|&v| v == 62));
        assert!(got.row(2).iter().all(|&v| v == 128));
        assert!(got.notes[0].contains("BT.601") && !got.notes[0].contains("alpha"));
        assert!(got.notes[1].contains("alpha composited on black"));
        assert!(got.notes[2].contains("16-bit"));
    }

    /// A wide image keeps its aspect ratio: 56×28 → 28×14, centred in rows 7..21 on background.
    #[test]
    fn wide_image_is_fitted_and_padded() {
        let dir = TempDir::new("wide");
        let p = dir.0.join("wide.png");
        GrayImage::from_pixel(56, 28, Luma([200])).save(&p).unwrap();
        let opts = ImageOptions {
            invert: Invert::Never,
            ..ImageOptions::default()
        };
        let got = load_inputs(std::slice::from_ref(&p), &opts).unwrap();
        // The border is all 200, so the frame is filled with 200 too: the image is uniform.
        assert!(got.rows.iter().all(|&v| v == 200));
        assert!(got.notes[0].contains("resized to 28×14") && got.notes[0].contains("background value 200"));
        // A black frame for a dark image: 56×28 of 50 (border mean 50 ≤ 127, no inversion).
        let p = dir.0.join("dark.png");
        let mut img = GrayImage::from_pixel(56, 28, Luma([0]));
        img.put_pixel(28, 14, Luma([255]));
        img.save(&p).unwrap();
        let got = load(&[p]).unwrap();
        assert_eq!(got.rows[..7 * 28], [0; 7 * 28]);
        assert!(got.rows[7 * 28..21 * 28].iter().any(|&v| v > 0));
    }

    #[test]
    fn jpeg_is_decoded() {
        let dir = TempDir::new("jpeg");
        let p = dir.0.join("flat.jpg");
        GrayImage::from_pixel(28, 28, Luma([90])).save(&p).unwrap();
        let got = load(&[p]).unwrap();
        assert!(got.rows.iter().all(|&v| v.abs_diff(90) <= 2), "{:?}", &got.rows[..8]);
    }

    #[test]
    fn npy_u8_round_trips_exactly() {
        let dir = TempDir::new("npy-u8");
        let data: Vec<u8> = (0..2 * 784).map(|i| (i * 31 % 256) as u8).collect();
        let p = dir.file("x.npy", &npy("|u1", false, "(2, 28, 28)", &data));
        let got = load(std::slice::from_ref(&p)).unwrap();
        assert_eq!(got.rows, data);
        let name = p.display().to_string();
        assert_eq!(got.names, vec![format!("{name}[0]"), format!("{name}[1]")]);
        assert!(got.notes.is_empty());
        // The same bytes as [2, 784], [2, 28, 28, 1] and one [28, 28] image.
        for shape in ["(2, 784)", "(2, 28, 28, 1)"] {
            let p = dir.file("y.npy", &npy("|u1", false, shape, &data));
            assert_eq!(load(&[p]).unwrap().rows, data, "{shape}");
        }
        let p = dir.file("one.npy", &npy("|u1", false, "(28, 28)", &data[..784]));
        let got = load(std::slice::from_ref(&p)).unwrap();
        assert_eq!(
            (got.rows.as_slice(), got.names),
            (&data[..784], vec![p.display().to_string()])
        );
    }

    #[test]
    fn npy_floats_k_over_255_round_trip() {
        let dir = TempDir::new("npy-f");
        let want: Vec<u8> = (0..784).map(|i| (i % 256) as u8).collect();
        let f32s: Vec<u8> = want.iter().flat_map(|&k| (k as f32 / 255.0).to_le_bytes()).collect();
        let f64s: Vec<u8> = want.iter().flat_map(|&k| (k as f64 / 255.0).to_be_bytes()).collect();
        let a = dir.file("a.npy", &npy("<f4", false, "(1, 784)", &f32s));
        let b = dir.file("b.npy", &npy(">f8", false, "(1, 784)", &f64s));
        let got = load(&[a, b]).unwrap();
        assert_eq!(got.row(0), want.as_slice());
        assert_eq!(got.row(1), want.as_slice());
        assert!(got.notes[0].contains("float32 values in [0, 1] → u8 as round(x·255)"));
        assert!(got.notes[1].contains("float64"));
    }

    /// Fortran order: a 2×3 image stored column by column comes back in rows.
    #[test]
    fn npy_fortran_order_is_reordered() {
        let dir = TempDir::new("npy-fortran");
        let opts = ImageOptions {
            height: 2,
            width: 3,
            invert: Invert::Always,
        };
        // C order [[1, 2, 3], [4, 5, 6]] is stored as 1 4 2 5 3 6 in Fortran order.
        let p = dir.file("f.npy", &npy("|u1", true, "(2, 3)", &[1, 4, 2, 5, 3, 6]));
        let got = load_inputs(&[p], &opts).unwrap();
        assert_eq!(got.rows, [254, 253, 252, 251, 250, 249]);
        assert!(got.notes[0].contains("Fortran") && got.notes[0].contains("inverted"));
        // [2, 2, 3] Fortran: element (n, i, j) at n + 2·i + 4·j.
        let c: Vec<u8> = (0..12).collect();
        let mut f = vec![0u8; 12];
        for n in 0..2 {
            for i in 0..2 {
                for j in 0..3 {
                    f[n + 2 * i + 4 * j] = c[n * 6 + i * 3 + j];
                }
            }
        }
        let p = dir.file("g.npy", &npy("|u1", true, "(2, 2, 3)", &f));
        let opts = ImageOptions {
            invert: Invert::Auto,
            ..opts
        };
        assert_eq!(load_inputs(&[p], &opts).unwrap().rows, c);
    }

    #[test]
    fn bad_npy_files_are_named_and_explained() {
        let dir = TempDir::new("npy-bad");
        let data = vec![7u8; 2 * 784];
        let full = npy("|u1", false, "(2, 28, 28)", &data);
        let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
            (
                "trunc.npy",
                full[..full.len() - 10].to_vec(),
                vec!["truncated", "1568", "1558"],
            ),
            ("magic.npy", b"PK\x03\x04 not numpy".to_vec(), vec!["bad magic"]),
            (
                "int.npy",
                npy("<i8", false, "(1, 784)", &[0; 784 * 8]),
                vec!["unsupported dtype '<i8'"],
            ),
            (
                "shape.npy",
                npy("|u1", false, "(3, 5)", &[0; 15]),
                vec!["[3, 5]", "[N, 784]"],
            ),
            ("empty.npy", npy("|u1", false, "(0, 784)", &[]), vec!["no samples"]),
            (
                "huge.npy",
                npy("|u1", false, "(18446744073709551615, 28, 28)", &[]),
                vec!["too large"],
            ),
            (
                "long.npy",
                npy("|u1", false, "(99999999999999999999999, 784)", &[]),
                vec!["integer too large"],
            ),
            (
                "deep.npy",
                npy("|u1", false, &"(".repeat(50), &[]),
                vec!["nests too deeply"],
            ),
            ("cut.npy", full[..40].to_vec(), vec!["truncated header"]),
            (
                "version.npy",
                b"\x93NUMPY\x09\x00\x10\x00".to_vec(),
                vec!["version 9.0"],
            ),
            (
                "record.npy",
                npy_raw("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }"),
                vec!["structured"],
            ),
            (
                "nokey.npy",
                npy_raw("{'descr': '|u1', 'shape': (1, 784), }"),
                vec!["fortran_order"],
            ),
        ];
        for (name, bytes, words) in cases {
            let p = dir.file(name, &bytes);
            let msg = err(&[p]);
            assert!(msg.contains(name), "{name}: {msg}");
            for w in words {
                assert!(msg.contains(w), "{name}: '{w}' missing from: {msg}");
            }
        }
        let mut vals: Vec<u8> = (0..784).flat_map(|_| 0.5f32.to_le_bytes()).collect();
        vals[4 * 30..4 * 31].copy_from_slice(&1.5f32.to_le_bytes());
        let p = dir.file("big.npy", &npy("<f4", false, "(1, 28, 28)", &vals));
        let msg = err(&[p]);
        assert!(
            msg.contains("big.npy") && msg.contains("value 1.5 at index [0, 1, 2]"),
            "{msg}"
        );
        vals[4 * 30..4 * 31].copy_from_slice(&f32::NAN.to_le_bytes());
        let p = dir.file("nan.npy", &npy("<f4", false, "(1, 28, 28)", &vals));
        let msg = err(&[p]);
        assert!(msg.contains("nan.npy") && msg.contains("NaN"), "{msg}");
    }

    /// A version-1 file with `header` as its dict and no data.
    fn npy_raw(header: &str) -> Vec<u8> {
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out
    }

    #[test]
    fn folder_is_loaded_in_name_order_and_skips_are_noted() {
        let dir = TempDir::new("folder");
        GrayImage::from_pixel(28, 28, Luma([20]))
            .save(dir.0.join("b.png"))
            .unwrap();
        GrayImage::from_pixel(28, 28, Luma([10]))
            .save(dir.0.join("a.png"))
            .unwrap();
        dir.file("readme.txt", b"hello");
        let got = load(std::slice::from_ref(&dir.0)).unwrap();
        let names: Vec<String> = ["a.png", "b.png"]
            .iter()
            .map(|n| dir.0.join(n).display().to_string())
            .collect();
        assert_eq!(got.names, names);
        assert_eq!((got.row(0)[0], got.row(1)[0]), (10, 20));
        assert_eq!(got.notes.len(), 1);
        assert!(got.notes[0].contains("skipped 1 entry") && got.notes[0].contains("readme.txt"));

        let empty = TempDir::new("folder-empty");
        let msg = err(std::slice::from_ref(&empty.0));
        assert!(
            msg.contains(&empty.0.display().to_string()) && msg.contains("it is empty"),
            "{msg}"
        );
        empty.file("x.txt", b"");
        let msg = err(std::slice::from_ref(&empty.0));
        assert!(msg.contains("it holds only x.txt"), "{msg}");
    }

    /// CRC-32 (IEEE) for hand-made PNG chunks.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }

    /// A PNG whose header claims `w × h` pixels of `depth` bits and `color` type, followed by a
    /// (meaningless) image data chunk: decoders read the header up to the first data chunk.
    fn png_claiming(w: u32, h: u32, depth: u8, color: u8) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[depth, color, 0, 0, 0]);
        for (kind, data) in [
            (&b"IHDR"[..], &ihdr[..]),
            (b"IDAT", &[0x78, 0x9c, 0, 0]),
            (b"IEND", &[]),
        ] {
            let mut chunk = kind.to_vec();
            chunk.extend_from_slice(data);
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(&chunk);
            out.extend_from_slice(&crc32(&chunk).to_be_bytes());
        }
        out
    }

    #[test]
    fn corrupt_and_hostile_images_are_refused() {
        let dir = TempDir::new("corrupt");
        // A PNG signature followed by pseudo-random bytes.
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut s = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..500 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bytes.push(s as u8);
        }
        let p = dir.file("noise.png", &bytes);
        let msg = err(&[p]);
        assert!(
            msg.contains("noise.png") && msg.contains("cannot decode the PNG image"),
            "{msg}"
        );
        // A valid header that claims 100000×100000 pixels: refused before any pixel buffer.
        let p = dir.file("huge.png", &png_claiming(100_000, 100_000, 8, 0));
        let msg = err(&[p]);
        assert!(msg.contains("huge.png") && msg.contains("limit"), "{msg}");
        // 16384×16384 passes the side limit, but as 16-bit RGBA it needs 16384·16384·8 bytes
        // = 2 GiB decoded: above the decoded-size limit, refused before decoding.
        let big = png_claiming(16_384, 16_384, 16, 6);
        let p = dir.file("deep.png", &big);
        let msg = err(&[p]);
        assert!(msg.contains("deep.png") && msg.contains("limit"), "{msg}");
        // Not an image at all, and a missing file.
        let p = dir.file("notes.txt", b"just text");
        let msg = err(&[p]);
        assert!(msg.contains("notes.txt") && msg.contains("not a PNG or JPEG"), "{msg}");
        let missing = dir.0.join("missing.png");
        assert!(err(&[missing]).contains("missing.png"));
    }

    #[test]
    fn options_are_checked() {
        assert!(load(&[]).is_err());
        let opts = ImageOptions {
            height: 0,
            ..ImageOptions::default()
        };
        assert!(load_inputs(&[PathBuf::from("x.png")], &opts)
            .unwrap_err()
            .to_string()
            .contains("height"));
        assert_eq!("Never".parse::<Invert>().unwrap(), Invert::Never);
        assert!("sometimes".parse::<Invert>().is_err());
    }
}
