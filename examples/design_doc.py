"""The design document's Keras program, run on qmomentum.

Only two things differ from the document: the import line (``from qmomentum import keras``
instead of ``import tensorflow as tf`` / ``tf.keras``) and the data loading, which reads the
Fashion-MNIST copy shipped in ``data/fashion-mnist/`` instead of downloading it. Everything else,
including the document's ``optimizers.Momentum(lr=0.001, momentum=0.9)`` (which real Keras does
not have), runs as written.

    pip install ./crates/qmomentum-py
    python examples/design_doc.py
"""

from qmomentum import keras  # was: import tensorflow as tf; keras = tf.keras
from qmomentum.datasets import fashion_mnist

# Data: 60,000 training and 10,000 test images, 28×28 grey levels, flattened to 784 in [0, 1].
(x_train, y_train), (x_test, y_test) = fashion_mnist.load_data()
x_train = x_train.reshape(-1, 784) / 255.0
x_test = x_test.reshape(-1, 784) / 255.0

# The design document's program.
model = keras.Sequential([
    keras.layers.Dense(128, activation='relu', input_shape=(784,)),
    keras.layers.Dense(64, activation='relu'),
    keras.layers.Dense(10, activation='softmax')
])

optimizer = keras.optimizers.Momentum(lr=0.001, momentum=0.9)

model.compile(optimizer=optimizer,
              loss='sparse_categorical_crossentropy',
              metrics=['accuracy'])

model.fit(x_train, y_train, epochs=10, batch_size=128)

test_loss, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
print(f"test loss {test_loss:.4f} - test accuracy {test_accuracy:.4f}")
