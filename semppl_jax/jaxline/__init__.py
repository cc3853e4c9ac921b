"""The jaxline side of semppl_jax: experiments, their config schema and checks, the mesh loop,
monitors and data sources.

Everything that reads an ``ml_collections`` config or depends on jaxline lives here; the
modules at the top of ``semppl_jax/`` are the pure library and never import this package.
"""
