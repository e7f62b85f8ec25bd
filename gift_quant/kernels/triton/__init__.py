"""The Triton backend: ``ops`` (layout cache, routes, custom ops), the kernels ``gemv`` (decode,
M <= 8) and ``mm`` (batched tensor-core, backward, dequantizer), their shared Triton pieces
``tiles``, and ``ptx`` (word layouts and the inline PTX of the GEMV). Importing ``ops`` raises
ImportError where Triton is missing; ``ptx`` needs only torch."""
