//! What a command reads: the data folder (found in a documented order) and model files
//! (a checkpoint or an exported integer model, told apart by their contents).

use anyhow::{bail, Context, Result};
use clap::Args;
use qmomentum::data::{Dataset, TEST_IMAGES};
use qmomentum::train::Trainer;
use std::path::{Path, PathBuf};

/// The environment variable that names the data folder when `--data` is not given.
pub const DATA_ENV: &str = "QMOMENTUM_DATA";

/// Where the data come from.
#[derive(Args, Debug, Clone, Default)]
pub struct DataArgs {
    /// A folder with the MNIST-family IDX files (train-images-idx3-ubyte[.gz], …). Default, in
    /// this order: $QMOMENTUM_DATA; ./data/fashion-mnist; data/fashion-mnist in a folder above
    /// the executable (the repository's copy); /usr/share/datasets/fashion-mnist (Debian).
    #[arg(long)]
    pub data: Option<PathBuf>,
}

fn holds_data(dir: &Path) -> bool {
    [format!("{TEST_IMAGES}.gz"), TEST_IMAGES.to_string()]
        .iter()
        .any(|f| dir.join(f).is_file())
}

impl DataArgs {
    /// The data folder: `--data` as given (errors about it come from the loader, naming the
    /// file), else the first of the default places that holds an MNIST-layout test set; the
    /// error lists every place tried.
    pub fn resolve(&self) -> Result<PathBuf> {
        if let Some(d) = &self.data {
            return Ok(d.clone());
        }
        let mut tried = Vec::new();
        if let Some(v) = std::env::var_os(DATA_ENV) {
            let d = PathBuf::from(v);
            if holds_data(&d) {
                return Ok(d);
            }
            crate::output::warn(format!(
                "${DATA_ENV} = {} holds no MNIST-layout test set (t10k-images-idx3-ubyte[.gz]); looking elsewhere",
                d.display()
            ));
            tried.push(format!("${DATA_ENV} = {}", d.display()));
        }
        let mut candidates = vec![PathBuf::from("data/fashion-mnist")];
        if let Ok(exe) = std::env::current_exe() {
            for dir in exe.ancestors().skip(1) {
                candidates.push(dir.join("data/fashion-mnist"));
            }
        }
        candidates.push(PathBuf::from("/usr/share/datasets/fashion-mnist"));
        for d in candidates {
            if holds_data(&d) {
                return Ok(d);
            }
            tried.push(d.display().to_string());
        }
        bail!(
            "no data folder given and none found; tried: {}. Pass --data DIR (a folder with \
             train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-…) or set ${DATA_ENV}",
            tried.join(", ")
        )
    }

    /// Training and test sets.
    pub fn load(&self) -> Result<(PathBuf, Dataset, Dataset)> {
        let dir = self.resolve()?;
        let (train, test) = Dataset::load_mnist_dir(&dir)?;
        Ok((dir, train, test))
    }

    /// The test set only (the training files may be absent).
    pub fn load_test(&self) -> Result<(PathBuf, Dataset)> {
        let dir = self.resolve()?;
        let test = Dataset::load_mnist_test(&dir)?;
        Ok((dir, test))
    }
}

/// A model file: a training checkpoint or an exported integer model.
pub enum ModelFile {
    /// A `qmomentum train`/`quantize` checkpoint (float or quantized).
    Checkpoint(Box<Trainer>),
    /// A `qmomentum export` integer model.
    Integer(Box<qmomentum_runtime::Model>),
}

impl ModelFile {
    /// Read `path` and tell the two kinds apart by their metadata (not by the file name).
    pub fn load(path: &Path) -> Result<ModelFile> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_bytes(path, &bytes)
    }

    /// As [`ModelFile::load`], from bytes already read.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<ModelFile> {
        if qmomentum::checkpoint::read_meta(bytes, path).is_ok() {
            return Ok(ModelFile::Checkpoint(Box::new(qmomentum::checkpoint::from_bytes(
                bytes, path,
            )?)));
        }
        match qmomentum_runtime::Model::from_bytes(bytes) {
            Ok(m) => Ok(ModelFile::Integer(Box::new(m))),
            Err(rt) => {
                // Say what it looked like to both readers.
                let ck = qmomentum::checkpoint::read_meta(bytes, path)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                bail!(
                    "{}: neither a qmomentum checkpoint nor an integer model file.\n  as a checkpoint: {ck}\n  as an integer model: {rt}",
                    path.display()
                )
            }
        }
    }
}
