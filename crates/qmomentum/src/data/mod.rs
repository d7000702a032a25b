//! Datasets: IDX files of the MNIST family kept as u8 in memory and normalised per batch.
//!
//! ```no_run
//! use qmomentum::data::Dataset;
//! let (train, test) = Dataset::load_mnist_dir("data/fashion-mnist".as_ref()).unwrap();
//! assert_eq!((train.len(), test.len()), (60_000, 10_000));
//! ```

pub mod files;
pub mod idx;

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The scale of the pixels: a model input is `pixel · PIXEL_SCALE` in `[0, 1]`. The training
/// pipeline, the f32 inference path and the exporter (the integer model's input grid) all use
/// this one constant, so their inputs are the same floats bit for bit.
pub const PIXEL_SCALE: f32 = 1.0 / 255.0;

/// The names of the ten Fashion-MNIST classes, in label order (Xiao et al. 2017).
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

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
    /// Per-sample dimensions as the file states them (`[28, 28]` for the MNIST family);
    /// their product is `features`.
    pub shape: Vec<usize>,
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
            images: huge_page_copy(im.data),
            labels: lb.data,
            features,
            classes,
            shape: im.dims[1..].to_vec(),
        })
    }

    /// Load `(train, test)` from a folder in the canonical MNIST layout.
    pub fn load_mnist_dir(dir: &Path) -> Result<(Dataset, Dataset)> {
        let train = Self::from_idx_files(&find(dir, TRAIN_IMAGES)?, &find(dir, TRAIN_LABELS)?, 10)?;
        let test = Self::load_mnist_test(dir)?;
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

    /// Load only the test set of a folder in the canonical MNIST layout (what `evaluate`,
    /// `predict` and `infer` need: the training files may be absent).
    pub fn load_mnist_test(dir: &Path) -> Result<Dataset> {
        let images = find(dir, TEST_IMAGES)?;
        let test = Self::from_idx_files(&images, &find(dir, TEST_LABELS)?, 10)?;
        if test.is_empty() {
            return Err(Error::data(images, "holds no images: there is nothing to test on"));
        }
        Ok(test)
    }

    /// Samples `idx` as f32 in `[0, 1]` (`pixel · PIXEL_SCALE`) into `x`, labels into `y`.
    pub fn gather_normalised(&self, idx: &[usize], x: &mut [f32], y: &mut [u32]) {
        let f = self.features;
        for (r, &i) in idx.iter().enumerate() {
            let src = &self.images[i * f..(i + 1) * f];
            normalise(src, &mut x[r * f..(r + 1) * f]);
            y[r] = self.labels[i] as u32;
        }
    }

    /// Ask the CPU to bring the rows of samples `idx` into this core's L2 cache, without waiting
    /// for them: the trainer calls it with the next step's rows while this step computes, so the
    /// next gather does not wait for ~100 scattered rows from memory one miss after another.
    /// Only a hint (no effect elsewhere than x86-64); indices past the end are ignored.
    pub fn prefetch(&self, idx: &[usize]) {
        let f = self.features;
        for &i in idx {
            if let Some(row) = self.images.get(i * f..(i + 1) * f) {
                crate::simd::prefetch_l2(crate::simd::Region::of(row));
            }
        }
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
            shape: self.shape.clone(),
        };
        Ok((part(0, n_tr), part(n_tr, self.len())))
    }
}

/// The test files of an MNIST-layout folder that exist (for checks that an output does not
/// overwrite them).
pub fn test_files(dir: &Path) -> Vec<PathBuf> {
    [TEST_IMAGES, TEST_LABELS]
        .iter()
        .filter_map(|s| find(dir, s).ok())
        .collect()
}

/// `data` in memory the kernel is asked to back with 2 MiB pages (`MADV_HUGEPAGE`, Linux; this
/// machine's transparent huge pages are in `madvise` mode): a shuffled batch reads rows
/// scattered over the whole set (47 MB for Fashion-MNIST), and with 4 KiB pages nearly every
/// row costs a TLB miss and a page walk. Measured (MLP epoch, 6 interleaved rounds): 0.2246 s →
/// 0.2005 s; the gather fell from 14 % to 6 % of a profile. A software prefetch of the next
/// batch's rows was tried too and measured no gain (0.2025 vs 0.2035 s): not kept. Small sets
/// are returned as they are.
fn huge_page_copy(data: Vec<u8>) -> Vec<u8> {
    const HUGE: usize = 2 << 20;
    if data.len() < 4 * HUGE || cfg!(not(target_os = "linux")) {
        return data;
    }
    let mut v: Vec<u8> = Vec::with_capacity(data.len());
    #[cfg(target_os = "linux")]
    {
        let start = v.as_ptr() as usize;
        let first = start.next_multiple_of(HUGE);
        let last = (start + data.len()) / HUGE * HUGE;
        if last > first {
            // SAFETY: [first, last) lies inside `v`'s allocation (capacity `data.len()`), which
            // is untouched so far; madvise only changes how the kernel backs those pages, and
            // its failure (THP disabled) is harmless: the copy below works either way.
            unsafe {
                libc::madvise(first as *mut libc::c_void, last - first, libc::MADV_HUGEPAGE);
            }
        }
    }
    v.extend_from_slice(&data);
    v
}

crate::simd::widest! {
    /// Pixels to model inputs: `x = p · PIXEL_SCALE` (widest instruction set: every training
    /// sample goes through it at every epoch).
    pub fn normalise(pixels: &[u8], x: &mut [f32]) {
        for (d, &p) in x.iter_mut().zip(pixels) {
            *d = p as f32 * PIXEL_SCALE;
        }
    }
}

/// One file of a data set and the SHA-256 of its bytes (as stored, compressed or not).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    /// File name inside the folder.
    pub name: String,
    /// Lower-case hex SHA-256.
    pub sha256: String,
}

/// What a run was trained on: the folder as given and the sums of its four IDX files. Stored in
/// checkpoints so that a resume onto other data is refused (the path may differ, the bytes not).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataIdentity {
    /// The folder as the user named it.
    pub path: String,
    /// The files, in the order train images, train labels, test images, test labels.
    pub files: Vec<FileSum>,
}

impl DataIdentity {
    /// Hash the IDX files of an MNIST-layout folder.
    pub fn of_dir(dir: &Path) -> Result<Self> {
        use sha2::{Digest, Sha256};
        let mut files = Vec::new();
        for stem in [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS] {
            let p = find(dir, stem)?;
            let mut f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
            let mut h = Sha256::new();
            std::io::copy(&mut f, &mut h).map_err(|e| Error::io(&p, e))?;
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
            files.push(FileSum { name, sha256 });
        }
        Ok(DataIdentity {
            path: dir.display().to_string(),
            files,
        })
    }

    /// The same bytes (whatever the folder is called now).
    pub fn same_data(&self, other: &DataIdentity) -> bool {
        let sums = |d: &DataIdentity| d.files.iter().map(|f| f.sha256.clone()).collect::<Vec<_>>();
        sums(self) == sums(other)
    }
}

/// Class names for a data folder: `classes.txt` in the folder (one name per line) if present,
/// Fashion-MNIST's names if the folder holds Fashion-MNIST as Debian and this repository ship it
/// (recognised by the SHA-256 of its gzip training images), none otherwise.
pub fn class_names_for(dir: &Path, identity: Option<&DataIdentity>) -> Result<Option<Vec<String>>> {
    let file = dir.join("classes.txt");
    if file.is_file() {
        return read_class_names(&file).map(Some);
    }
    const FASHION_TRAIN_IMAGES_GZ: &str = "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7";
    let is_fashion = identity.is_some_and(|d| d.files.first().is_some_and(|f| f.sha256 == FASHION_TRAIN_IMAGES_GZ));
    Ok(is_fashion.then(|| FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect()))
}

/// A class-names file: one name per line, blank lines ignored.
pub fn read_class_names(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let names: Vec<String> = text
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if names.is_empty() {
        return Err(Error::data(path, "no class names (expected one name per line)"));
    }
    Ok(names)
}
