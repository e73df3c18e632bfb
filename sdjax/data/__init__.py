"""Data: sources (bundled, TFDS, prepared image-caption records, cached latents), preprocessing, the grain
input pipeline (global shuffle, per-host reading, checkpointable state), `prepare` and `cache_latents` CLIs."""
from sdjax.data.bundled import load_bundled
from sdjax.data.pipeline import Pipeline

__all__ = ["load_bundled", "Pipeline"]
