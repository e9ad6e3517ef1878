"""Hand-written Pallas kernels for the GPU hot loops (installed as ``nfjax.kernels``).

Every kernel here has a pure-JAX twin in ``nfjax`` that is its reference and the CPU path;
tests run kernels with ``interpret=True`` on the CPU and require exact agreement.
"""
