//! The design document's Keras program, line for line, in Rust.
//!
//! ```python
//! model = tf.keras.Sequential([
//!     tf.keras.layers.Dense(128, activation='relu', input_shape=(784,)),
//!     tf.keras.layers.Dense(64, activation='relu'),
//!     tf.keras.layers.Dense(10, activation='softmax')
//! ])
//! optimizer = tf.keras.optimizers.SGD(learning_rate=0.001, momentum=0.9)  # the doc's "Momentum(lr=…)"
//! model.compile(optimizer=optimizer, loss='sparse_categorical_crossentropy', metrics=['accuracy'])
//! model.fit(x_train, y_train, epochs=10, batch_size=128)
//! ```
//!
//! Run: `cargo run --release --example design_doc -p qmomentum [-- DATA_DIR]`

use qmomentum::prelude::*;

fn main() -> qmomentum::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "data/fashion-mnist".into());
    let (x_train, x_test) = Dataset::load_mnist_dir(dir.as_ref())?;

    let model = ModelConfig {
        input: 784,
        layers: vec![
            LayerConfig::Dense {
                units: 128,
                activation: Activation::Relu,
                quant: None,
            },
            LayerConfig::Dense {
                units: 64,
                activation: Activation::Relu,
                quant: None,
            },
            LayerConfig::Dense {
                units: 10,
                activation: Activation::Softmax,
                quant: None,
            },
        ],
        ..Default::default()
    };
    let optimizer = OptimizerConfig {
        lr: 0.001,
        momentum: 0.9,
        ..Default::default()
    };
    // compile: the loss is sparse categorical cross-entropy (fused with the softmax), metric accuracy.
    let config = TrainConfig {
        model,
        optimizer,
        epochs: 10,
        batch_size: 128,
        ..Default::default()
    };
    let mut model = Trainer::new(config)?;

    model.fit(&x_train, None, |_, event| {
        if let qmomentum::train::Event::Epoch(r) = event {
            println!(
                "Epoch {}/10 - {:.2}s - loss: {:.4} - accuracy: {:.4}",
                r.epoch, r.seconds, r.loss, r.accuracy
            );
        }
    })?;
    let (loss, accuracy) = model.evaluate(&x_test)?;
    println!("test loss: {loss:.4} - test accuracy: {accuracy:.4}");
    Ok(())
}
