"""fundus_batch: degradation synthesis and Cofe-Net enhancement of fundus archives at scale."""

__version__ = "0.1.0"
