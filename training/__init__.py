"""PC-AVS training pipeline: preprocess, data, the three stages, export (see training/train.py)."""
