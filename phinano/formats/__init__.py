"""phinano.formats: weights as they are stored on disk, named and shaped, for the kernels to read.

- `quantized` : GGML's packed block types (Q8_0, ...) as `QuantizedTensor`, which the kernels multiply
                without unpacking the whole matrix.
"""
