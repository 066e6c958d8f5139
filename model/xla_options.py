"""Compiler options this project passes to its jitted functions (`jax.jit(..., compiler_options=...)`).

On CPU, XLA (jaxlib 0.10) hands dots and convolutions to YNNPACK fusions by default; at the shapes
this project runs, Eigen's kernels were faster. Measured on the 2-core CPU of the development
machine, same process, default vs these options: VQGAN decoding of 9 embedded-model images
125 -> 89 ms, the embedded model's decoding step (18 rows) 3.8-4.0 -> 3.3-3.6 ms, mini's GLU
matmuls at 2 rows 1.89 -> 1.58 ms and at 18 rows 2.79 -> 2.73 ms, a training step of the VQGAN's
decoder (batch 32) ~1.8 -> ~1.4 s. Reductions stay with YNNPACK
(turning every YNNPACK fusion off was no faster and logs "Unsupported fusion type" errors).

Options are per function, not the process-wide XLA_FLAGS, so importing the library changes
nothing for other JAX code; other backends get none.
"""

import jax

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options() -> dict | None:
    """The options for the default backend (initializes it); None where there are none."""
    return dict(CPU_OPTIONS) if jax.default_backend() == "cpu" else None
