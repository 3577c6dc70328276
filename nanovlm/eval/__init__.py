"""Evaluation tasks: `nanovlm eval --model DIR --task easyvqa` and the accuracy checks of training."""
