//! The IDX format of the MNIST family (MNIST, Fashion-MNIST, KMNIST), raw or gzip-compressed.
//!
//! Header: two zero bytes, a type byte (0x08 = u8), the number of dimensions, then each dimension
//! as a big-endian u32; then the data. Images are `idx3` (count × rows × cols), labels `idx1`.
//! Every allocation is bounded by what the file actually holds: a header that claims 2^40 images
//! is compared with the real (decompressed) length before anything is sized from it.

use crate::error::{Error, Result};
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::Path;

/// An IDX file of u8 values.
#[derive(Debug, Clone)]
pub struct Idx {
    /// The dimensions as the header states them.
    pub dims: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<u8>,
}

/// Largest decompressed IDX we accept (1 GiB): far above any of the MNIST family.
const MAX_IDX_BYTES: u64 = 1 << 30;

/// Read an IDX file (gzip is recognised by its magic bytes, not by the name). A gzip file is
/// decompressed as a stream from the file, so only the decompressed bytes are ever held.
pub fn read_idx(path: &Path) -> Result<Idx> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    read_from(std::io::BufReader::new(f), path)
}

/// Parse IDX bytes (raw or gzip); `path` is only used in error messages.
pub fn parse_idx(raw: &[u8], path: &Path) -> Result<Idx> {
    read_from(raw, path)
}

/// The one reading path of [`read_idx`] and [`parse_idx`]: peek at the first two bytes, stream
/// through gzip when they are its magic, and bound what is read to 1 GiB (+1 byte to detect more).
fn read_from(mut r: impl std::io::BufRead, path: &Path) -> Result<Idx> {
    let gz = r.fill_buf().map_err(|e| Error::io(path, e))?.starts_with(&[0x1f, 0x8b]);
    let mut out = Vec::new();
    let res = if gz {
        GzDecoder::new(r).take(MAX_IDX_BYTES + 1).read_to_end(&mut out)
    } else {
        r.take(MAX_IDX_BYTES + 1).read_to_end(&mut out)
    };
    res.map_err(|e| {
        if gz {
            Error::data(path, format!("corrupt gzip stream: {e}"))
        } else {
            Error::io(path, e)
        }
    })?;
    if out.len() as u64 > MAX_IDX_BYTES {
        return Err(Error::data(
            path,
            "larger than 1 GiB (decompressed): not an MNIST-family file",
        ));
    }
    parse_raw(out, path)
}

/// Parse uncompressed IDX bytes, keeping the buffer (the header is removed in place).
fn parse_raw(mut buf: Vec<u8>, path: &Path) -> Result<Idx> {
    if buf.len() < 4 {
        return Err(Error::data(
            path,
            format!("truncated: {} bytes, an IDX header needs at least 4", buf.len()),
        ));
    }
    if buf[0] != 0 || buf[1] != 0 {
        return Err(Error::data(
            path,
            format!(
                "wrong magic number 0x{:02x}{:02x}{:02x}{:02x}: not an IDX file",
                buf[0], buf[1], buf[2], buf[3]
            ),
        ));
    }
    if buf[2] != 0x08 {
        return Err(Error::data(
            path,
            format!("IDX type 0x{:02x} is not supported (only 0x08 = unsigned byte)", buf[2]),
        ));
    }
    let nd = buf[3] as usize;
    if nd == 0 || nd > 4 {
        return Err(Error::data(path, format!("IDX with {nd} dimensions (expected 1 to 4)")));
    }
    let header = 4 + 4 * nd;
    if buf.len() < header {
        return Err(Error::data(
            path,
            format!("truncated header: {} bytes, {nd} dimensions need {header}", buf.len()),
        ));
    }
    let mut dims = Vec::with_capacity(nd);
    for d in 0..nd {
        let o = 4 + 4 * d;
        dims.push(u32::from_be_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]) as usize);
    }
    // Every partial product must fit (a zero dimension must not hide an overflowing rest: code
    // downstream multiplies the trailing dimensions to get the values per sample).
    let mut total: u64 = 1;
    for &v in &dims {
        total = total
            .checked_mul(v as u64)
            .filter(|t| *t <= MAX_IDX_BYTES)
            .ok_or_else(|| {
                Error::data(
                    path,
                    format!("header dimensions {dims:?} describe more than 1 GiB of data"),
                )
            })?;
    }
    if dims[1..]
        .iter()
        .try_fold(1u64, |a, &v| a.checked_mul(v as u64).filter(|t| *t <= MAX_IDX_BYTES))
        .is_none()
    {
        return Err(Error::data(
            path,
            format!("header dimensions {dims:?} describe more than 1 GiB per sample"),
        ));
    }
    let have = (buf.len() - header) as u64;
    if total != have {
        return Err(Error::data(
            path,
            format!(
                "{}: header dimensions {:?} need {total} data bytes, file has {have}",
                if total > have { "truncated" } else { "trailing bytes" },
                dims
            ),
        ));
    }
    buf.drain(..header);
    Ok(Idx { dims, data: buf })
}

#[cfg(test)]
mod tests {
    use super::*;
    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }
    #[test]
    fn parses_raw_and_gzip() {
        let raw = idx(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let p = Path::new("t");
        let a = parse_idx(&raw, p).unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &raw).unwrap();
        let b = parse_idx(&gz.finish().unwrap(), p).unwrap();
        assert_eq!(b.data, a.data);
    }
    #[test]
    fn huge_claimed_count_is_rejected_without_allocating() {
        let raw = idx(&[0xFFFF_FFFF, 28, 28], &[0; 10]);
        let e = parse_idx(&raw, Path::new("big")).unwrap_err().to_string();
        assert!(e.contains("more than 1 GiB") && e.contains("big"), "{e}");
    }
    #[test]
    fn bad_magic_and_type() {
        let mut raw = idx(&[1], &[0]);
        raw[2] = 0x0D;
        assert!(parse_idx(&raw, Path::new("f"))
            .unwrap_err()
            .to_string()
            .contains("type 0x0d"));
        let e = parse_idx(b"PK\x03\x04xx", Path::new("f")).unwrap_err().to_string();
        assert!(e.contains("wrong magic"), "{e}");
    }
}
