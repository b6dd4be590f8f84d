"""Metrics: classification (ACC/AUC/F1), segmentation (Dice/HD95), efficiency. Import the submodules directly."""
