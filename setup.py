"""semppl_jax: SemPPL (ICLR 2023) semi-supervised contrastive learning in JAX + Haiku."""
import setuptools

setuptools.setup(
    name="semppl_jax",
    version="0.1.0",
    description="SemPPL: kNN pseudo-labels and semantic positives for contrastive learning, in JAX.",
    packages=setuptools.find_packages(include=["semppl_jax", "semppl_jax.*"]),
    package_data={"semppl_jax.data": ["splits/*.json"]},
    python_requires=">=3.11",
    install_requires=[],  # pinned in requirements.txt, installed by scripts/setup_env.sh
)
