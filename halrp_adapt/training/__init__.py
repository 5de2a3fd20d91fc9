"""Continual training loops built on the handle: `ContinualTrainer` and the recipes' arguments,
accuracy metrics, run reports and plots, experiment trackers.
"""
