"""Data sources and input pipelines."""
from sdjax.data.bundled import load_bundled
from sdjax.data.pipeline import StepBatches

__all__ = ["load_bundled", "StepBatches"]
