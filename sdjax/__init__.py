"""sdjax."""
