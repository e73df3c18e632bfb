"""Evaluation metrics for image generation: FID and Inception features, CLIP score."""
