"""Diffusers-format folders and original single-file checkpoints <-> sdjax params (safetensors, no torch)."""
from sdjax.convert.diffusers import (Pipeline, load_component, load_controlnet, load_pipeline,
                                     load_single_file, load_text_encoder, load_unet, load_vae, params_hash,
                                     save_component, save_pipeline)
from sdjax.convert.safetensors_io import CorruptCheckpointError
from sdjax.convert.safety_checker import SafetyChecker, load_safety_checker
from sdjax.convert.tree import WeightMismatchError

__all__ = ["CorruptCheckpointError", "Pipeline", "WeightMismatchError", "load_component", "load_controlnet",
           "load_pipeline", "load_safety_checker", "load_single_file", "load_text_encoder", "load_unet", "load_vae",
           "params_hash", "SafetyChecker", "save_component", "save_pipeline"]
