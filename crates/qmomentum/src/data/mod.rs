//! Datasets: IDX files of the MNIST family kept as u8 in memory and normalised per batch.
//!
//! ```no_run
//! use qmomentum::data::Dataset;
//! let (train, test) = Dataset::load_mnist_dir("data/fashion-mnist".as_ref()).unwrap();
//! assert_eq!((train.len(), test.len()), (60_000, 10_000));
//! ```

pub mod idx;

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Images as u8 (one row of `features` bytes per sample) and labels in `0..classes`.
///
/// Keeping u8 costs one byte per pixel (47 MB for the 60k Fashion-MNIST training set) instead of
/// four; [`Dataset::gather_normalised`] turns a batch into f32 in `[0, 1]` when it is used.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// `len × features` pixels.
    pub images: Vec<u8>,
    /// One label per sample.
    pub labels: Vec<u8>,
    /// Values per sample (784 for 28×28).
    pub features: usize,
    /// Number of classes (labels are checked to be below it).
    pub classes: usize,
}

/// File names of the canonical MNIST-family layout (`.gz` or uncompressed).
pub const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
/// Training labels.
pub const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
/// Test images.
pub const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
/// Test labels.
pub const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";

fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    for cand in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(&cand);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::data(
        dir.join(format!("{stem}.gz")),
        format!("not found (looked for {stem}.gz and {stem} in {})", dir.display()),
    ))
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Load an image file and a label file, checking counts and labels (`classes` = 10 for MNIST).
    pub fn from_idx_files(images: &Path, labels: &Path, classes: usize) -> Result<Self> {
        let im = idx::read_idx(images)?;
        let lb = idx::read_idx(labels)?;
        if im.dims.len() < 2 {
            return Err(Error::data(
                images,
                format!("images need at least 2 dimensions, header has {:?}", im.dims),
            ));
        }
        if lb.dims.len() != 1 {
            return Err(Error::data(
                labels,
                format!("labels need 1 dimension, header has {:?}", lb.dims),
            ));
        }
        let n = im.dims[0];
        if lb.dims[0] != n {
            return Err(Error::data(
                labels,
                format!("{} labels but {} has {} images", lb.dims[0], images.display(), n),
            ));
        }
        let features: usize = im.dims[1..].iter().product();
        if let Some((i, &l)) = lb.data.iter().enumerate().find(|(_, &l)| l as usize >= classes) {
            return Err(Error::data(
                labels,
                format!("label {l} at index {i} is out of range (classes = {classes})"),
            ));
        }
        Ok(Dataset {
            images: im.data,
            labels: lb.data,
            features,
            classes,
        })
    }

    /// Load `(train, test)` from a folder in the canonical MNIST layout.
    pub fn load_mnist_dir(dir: &Path) -> Result<(Dataset, Dataset)> {
        let train = Self::from_idx_files(&find(dir, TRAIN_IMAGES)?, &find(dir, TRAIN_LABELS)?, 10)?;
        let test = Self::from_idx_files(&find(dir, TEST_IMAGES)?, &find(dir, TEST_LABELS)?, 10)?;
        if train.features != test.features {
            return Err(Error::data(
                dir,
                format!(
                    "train images have {} values each, test images {}",
                    train.features, test.features
                ),
            ));
        }
        Ok((train, test))
    }

    /// Samples `idx` as f32 in `[0, 1]` (`pixel / 255`) into `x`, labels into `y`.
    pub fn gather_normalised(&self, idx: &[usize], x: &mut [f32], y: &mut [u32]) {
        let f = self.features;
        const INV: f32 = 1.0 / 255.0;
        for (r, &i) in idx.iter().enumerate() {
            let src = &self.images[i * f..(i + 1) * f];
            for (d, &s) in x[r * f..(r + 1) * f].iter_mut().zip(src) {
                *d = s as f32 * INV;
            }
            y[r] = self.labels[i] as u32;
        }
    }

    /// The raw u8 rows of `range` (for integer inference).
    pub fn rows(&self, range: std::ops::Range<usize>) -> &[u8] {
        &self.images[range.start * self.features..range.end * self.features]
    }

    /// Split off the last `fraction` of samples (Keras `validation_split`: taken from the end,
    /// before shuffling).
    pub fn split_validation(&self, fraction: f32) -> Result<(Dataset, Dataset)> {
        if !(0.0..1.0).contains(&fraction) || !fraction.is_finite() {
            return Err(Error::config("validation_split", fraction, "must be in [0, 1)"));
        }
        let n_val = (self.len() as f64 * fraction as f64).floor() as usize;
        let n_tr = self.len() - n_val;
        let f = self.features;
        let part = |a: usize, b: usize| Dataset {
            images: self.images[a * f..b * f].to_vec(),
            labels: self.labels[a..b].to_vec(),
            features: f,
            classes: self.classes,
        };
        Ok((part(0, n_tr), part(n_tr, self.len())))
    }
}
