"""Training data: synthetic emoji scenes with captions (scenes.py)."""
