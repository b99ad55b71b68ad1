"""neox-jax: GPT-NeoX-20B and Pythia in JAX/Flax."""

__version__ = "0.1.0"
