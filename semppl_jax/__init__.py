"""semppl_jax: SemPPL (Bošnjak et al., ICLR 2023) in JAX + Haiku.

Submodules are imported explicitly (``from semppl_jax import knn``) so that importing one pure
module never pulls in TensorFlow or jaxline.
"""

__version__ = "0.1.0"
