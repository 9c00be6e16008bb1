"""fundus_batch: degradation synthesis and Cofe-Net enhancement of fundus archives at scale."""

# The package version (pyproject.toml reads it from here); every output row records it.
__version__ = "0.2.0.dev0"
