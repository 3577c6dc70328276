"""Evaluation: `nanovlm eval --model DIR --data FILE` (any data, `vqa.py`), `--task easyvqa`
(`easyvqa.py`), and the accuracy checks of training."""
