//! `qmomentum import` (a PyTorch state_dict in safetensors → a checkpoint) and
//! `qmomentum export --format torch` (a checkpoint → a PyTorch state_dict). The mapping and its
//! checks are the library's [`qmomentum::torch`]; `doc/pytorch.md` is the guide.

use crate::output::{warn, write_output};
use crate::train_cmd::RunFiles;
use anyhow::{bail, Context, Result};
use clap::Args;
use qmomentum::config::{ModelConfig, TrainConfig};
use qmomentum::train::Trainer;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// A PyTorch state_dict saved with safetensors (`safetensors.torch.save_file(model.state_dict(), …)`).
    state_dict: PathBuf,
    /// The architecture and the run's settings: a TOML config as for `train` (see `configs/`).
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    config: Option<PathBuf>,
    /// Or a model by name: mlp | cnn-small | lenet5 (with the default training settings).
    #[arg(long)]
    model: Option<String>,
    /// The modules with parameters, in layer order, comma-separated (`features.0,features.1,classifier.1`):
    /// needed only when the names do not tell the order (by default the natural order of the
    /// names, as in an nn.Sequential).
    #[arg(long, value_delimiter = ',')]
    names: Option<Vec<String>>,
    /// Where to write the checkpoint: a folder (as FOLDER/checkpoint.safetensors, which
    /// `train --out FOLDER --resume` continues) or a file name ending in .safetensors.
    #[arg(long, short)]
    output: PathBuf,
}

/// The checkpoint file that `-o` names.
fn checkpoint_path(out: &Path) -> PathBuf {
    if out.extension().is_some_and(|e| e == "safetensors") && !out.is_dir() {
        out.to_path_buf()
    } else {
        RunFiles::new(out).checkpoint
    }
}

pub fn import(a: ImportArgs) -> Result<()> {
    let config = match (&a.config, &a.model) {
        (Some(p), _) => TrainConfig::from_toml_file(p)?,
        (None, Some(name)) => TrainConfig {
            model: ModelConfig::named(name)?,
            ..TrainConfig::default()
        },
        (None, None) => bail!("give the architecture: --config FILE or --model NAME"),
    };
    let target = checkpoint_path(&a.output);
    crate::output::refuse_if_input(&target, &[&a.state_dict])?;
    if target.exists() {
        bail!(
            "{} exists; import never replaces a checkpoint: choose another -o",
            target.display()
        );
    }
    let bytes = std::fs::read(&a.state_dict).with_context(|| format!("cannot read {}", a.state_dict.display()))?;
    let imported = qmomentum::torch::import_state_dict(&bytes, &a.state_dict, config, a.names.as_deref())?;
    for n in &imported.notes {
        warn(n);
    }
    let t = imported.trainer;
    if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the output folder", dir.display()))?;
    }
    qmomentum::checkpoint::save(&t, &target)?;
    outln!(
        "imported {} tensors ({} parameters) from {} into {}",
        imported.tensors,
        t.model.param_count(),
        a.state_dict.display(),
        t.config.model.summary()
    )?;
    for (m, layer, what) in &imported.mapping {
        outln!("  '{m}' → layer {layer} ({what})")?;
    }
    outln!("wrote {}", target.display())?;
    Ok(())
}

/// `export --format torch`: the state_dict to `output`, the nn.Sequential to stdout (stderr when
/// the file itself goes to stdout).
pub fn export(t: &Trainer, checkpoint: &Path, output: &Path) -> Result<()> {
    let e =
        qmomentum::torch::export_state_dict(t).with_context(|| format!("cannot export {}", checkpoint.display()))?;
    write_output(output, &e.bytes)?;
    for n in &e.notes {
        warn(n);
    }
    let msg = format!(
        "wrote {} ({} bytes, {} tensors, PyTorch state_dict); the matching module (also in the file's metadata, '{}'):\nimport safetensors.torch\nimport torch.nn as nn\nmodel = {}\nmodel.load_state_dict(safetensors.torch.load_file({:?}))",
        output.display(),
        e.bytes.len(),
        e.tensors,
        qmomentum::torch::DEFINITION_KEY,
        e.definition,
        output.display().to_string()
    );
    if crate::output::is_stdout(output) {
        eprintln!("{msg}");
        Ok(())
    } else {
        outln!("{msg}")
    }
}
