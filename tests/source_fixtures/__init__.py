"""Builders of tiny fixtures laid out exactly as each real Hand3D source dataset stores its files (one module each)."""
