"""Hand-written Pallas kernels for the GPU hot loops (installed as ``nfjax.kernels``).

There are none yet. The hot loops (the screen's per-(voxel, spot) footprint count in
``nfjax.score``, the batched refinement in ``nfjax.fit``, the image filters in
``nfjax.images``) are pure JAX, fused by XLA, and no GPU has been available to measure
them or a kernel against them. A kernel added here must keep its pure-JAX twin in
``nfjax`` as the reference and the CPU path, and be tested against it with
``interpret=True`` on the CPU, requiring exact agreement.
"""
