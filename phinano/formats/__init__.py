"""phinano.formats: weights as they are stored on disk, named and shaped, for the kernels to read.

- `quantized` : GGML's packed block types (Q8_0, ...) as `QuantizedTensor`, which the kernels multiply
                without unpacking the whole matrix.
- `kquants`   : GGML's K-quants (Q4_K, Q5_K, Q6_K: super-blocks of 256 weights), added to
                `quantized.LAYOUTS` when this package is imported.
"""

from . import kquants  # noqa: F401 - registers the K-quant layouts before any QuantizedTensor is made
