"""Training: a run is the recipe's stages (`recipe.py`) on one trainer (`step.py`); `nanovlm train`
calls `nanovlm.train.run.run_training`, the run itself is `nanovlm.train.loop.train`.
"""
