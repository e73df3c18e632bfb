"""Training: state, optimizer, losses, the pure train step and the driver loop."""
