"""Training: `nanovlm train` calls `run.run_training`; a run (`loop.train`) is stages on one trainer (`step.py`)."""
