//! The model: an input spec and a chain of layers, validated once and compiled for the kernels.
//!
//! [`Model::new`] is the single validation gate: [`Model::from_bytes`] only checks the container
//! ([`crate::format`]) and each op's fields and tensor shapes, then calls it, so a model built
//! in memory and a model loaded from disk obey the same rules.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::Error;
use crate::format::{self, InputSpec};
use crate::kernels::KernelKind;
use crate::ops::{self, ActSpec, Compiled, Layer, LayerStorage, MAC_FACTOR, VALUE_FACTOR};

/// A validated integer model with its weights packed for the kernels.
///
/// Build one with [`Model::new`] or [`Model::from_bytes`] / [`Model::load`]; run it with the
/// methods in [`crate::engine`].
#[derive(Clone)]
pub struct Model {
    pub(crate) input: InputSpec,
    pub(crate) layers: Vec<Layer>,
    /// One compiled op per layer (shared by clones: the packed weights never change).
    pub(crate) compiled: Vec<Arc<dyn Compiled>>,
    pub(crate) kernel: KernelKind,
    /// Identifies the model's shape for [`crate::Workspace`] checks (clones share it).
    pub(crate) id: u64,
    /// Names of the output classes (the file's optional `classes`).
    pub(crate) class_names: Option<Vec<String>>,
    /// Logits per sample (the last layer's outputs), looked up on every run.
    classes: usize,
}

/// Shapes only: the weights would print hundreds of thousands of numbers.
impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let layers: Vec<String> = self
            .layers
            .iter()
            .map(|l| {
                format!(
                    "{} {}→{} {}",
                    l.kind_name(),
                    l.inputs(),
                    l.outputs(),
                    l.output().kind_name()
                )
            })
            .collect();
        f.debug_struct("Model")
            .field("input", &self.input)
            .field("layers", &layers)
            .field("kernel", &self.kernel)
            .finish()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Model {
    /// Validates `input` and `layers` against the format's rules and packs the weights.
    ///
    /// Errors name the offending tensor (by its file name, e.g. `layers.1.shift`), channel and
    /// value, or the layer and the sizes that do not chain.
    pub fn new(input: InputSpec, layers: Vec<Layer>) -> Result<Model, Error> {
        validate(&input, &layers)?;
        let compiled = layers.iter().map(|l| l.op().compile(l)).collect::<Result<_, _>>()?;
        let classes = layers.last().map_or(0, Layer::outputs);
        Ok(Model {
            classes,
            input,
            layers,
            compiled,
            kernel: KernelKind::detect(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            class_names: None,
        })
    }

    /// The input mapping.
    pub fn input(&self) -> &InputSpec {
        &self.input
    }

    /// The layers, as stored in the file.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Per layer, what its tensors take in the file [`Model::to_bytes`] writes: weights, bits
    /// per weight, weight bytes and all tensor bytes (see [`LayerStorage`]; `f32_weight_bytes`
    /// and `ratio_to_f32` compare with f32 weights).
    pub fn layer_storage(&self) -> Vec<LayerStorage> {
        self.layers.iter().map(Layer::storage).collect()
    }

    /// Number of logits per sample (the last layer's outputs).
    pub fn num_classes(&self) -> usize {
        self.classes
    }

    /// The kernel tier [`Model::run`](crate::Model::run) uses (the best this CPU supports).
    pub fn kernel(&self) -> KernelKind {
        self.kernel
    }

    /// Parses and validates a model file held in memory. Never panics, whatever the bytes;
    /// every allocation is bounded by a small multiple of `bytes.len()`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Model, Error> {
        let doc = format::parse(bytes, ops::read_layer)?;
        if let (Some(c), Some(last)) = (&doc.classes, doc.layers.last()) {
            if c.len() != last.outputs() {
                return Err(Error::field(
                    "classes",
                    format!("{} names for {} outputs", c.len(), last.outputs()),
                ));
            }
        }
        Ok(Model::new(doc.input, doc.layers)?.with_class_names(doc.classes))
    }

    /// The same model with class names (label order; shown by `predict`). Names that do not
    /// match the number of outputs are dropped.
    pub fn with_class_names(mut self, names: Option<Vec<String>>) -> Model {
        self.class_names = names.filter(|n| n.len() == self.num_classes());
        self
    }

    /// The class names stored in the file, if any.
    pub fn class_names(&self) -> Option<&[String]> {
        self.class_names.as_deref()
    }

    /// Reads and validates a model file; errors name the file.
    pub fn load(path: &Path) -> Result<Model, Error> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Model::from_bytes(&bytes).map_err(|e| Error::InFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Serialises the model to the file format. Each `dense_i8` / `conv2d_i8` layer's weights
    /// are stored with the narrowest `weight_bits` (2, 4 or 8) that holds all of its codes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        self.to_bytes_min_weight_bits(2)
    }

    /// [`Model::to_bytes`] with no layer's weights narrower than `min_bits` (2, 4 or 8): 8
    /// writes plain I8 weight tensors and no `weight_bits` field, as readers that predate
    /// low-bit storage expect.
    pub fn to_bytes_min_weight_bits(&self, min_bits: u8) -> Result<Vec<u8>, Error> {
        if !crate::lowbit::WEIGHT_BITS.contains(&min_bits) {
            return Err(Error::field("weight_bits", format!("{min_bits}, expected 2, 4 or 8")));
        }
        format::serialize(
            &self.input,
            &self.layers,
            self.class_names.as_deref(),
            min_bits,
            ops::write_layer,
        )
    }

    /// Writes the model file with [`crate::io::write_file`]: atomically (a temporary file in
    /// the same folder, synced, then renamed over `path`) when `path` is a regular file or
    /// does not exist, through it when it is a device or FIFO; a failure leaves `path` and its
    /// folder as they were.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let bytes = self.to_bytes()?;
        crate::io::write_file(path, &bytes).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Checks every rule of the format's Validation section on in-memory data: the input, then
/// each layer against what the previous one produces (each op's `validate`), where the logits
/// are, and the size limits (see `ops/spatial.rs`): activation values and multiply-adds per
/// sample, summed over the layers, within [`VALUE_FACTOR`] and [`MAC_FACTOR`] times the model's
/// size (`input.size` plus its tensor bytes).
fn validate(input: &InputSpec, layers: &[Layer]) -> Result<(), Error> {
    input.validate()?;
    if layers.is_empty() {
        return Err(Error::field("layers", "the model has no layers"));
    }
    let last = layers.len() - 1;
    let mut act = ActSpec {
        bits: input.binarize_at.is_some(),
        size: input.size,
        shape: input.shape,
        desc: if input.binarize_at.is_some() {
            "the binarized input".to_string()
        } else {
            "input.size".to_string()
        },
        shape_desc: "input.shape".to_string(),
        macs: 0,
    };
    let model_size = layers.iter().map(|l| l.op().param_bytes(l) as u128).sum::<u128>() + input.size as u128;
    let (mut values, mut macs) = (0u128, 0u128);
    for (i, layer) in layers.iter().enumerate() {
        act = layer.op().validate(layer, i, &act)?;
        values += act.size as u128;
        macs += act.macs;
        if values > VALUE_FACTOR * model_size {
            return Err(Error::layer(
                i,
                format!(
                    "{} makes {values} activation values per sample with the layers before it, more than {VALUE_FACTOR} × the model's size of {model_size} (input values + tensor bytes)",
                    act.desc
                ),
            ));
        }
        if macs > MAC_FACTOR * model_size {
            return Err(Error::layer(
                i,
                format!(
                    "{} takes {macs} multiply-adds per sample with the layers before it, more than {MAC_FACTOR} × the model's size of {model_size} (input values + tensor bytes)",
                    act.desc
                ),
            ));
        }
        let is_logits = layer.output().is_logits();
        if is_logits && i != last {
            return Err(Error::layer(i, "only the last layer may output logits"));
        }
        if !is_logits && i == last {
            return Err(Error::layer(
                i,
                format!("the last layer must output logits, not {}", layer.output().kind_name()),
            ));
        }
    }
    Ok(())
}
