"""Training: settings, optimizer and schedule, checkpoints, processes, the loop, and reports.

`nanovlm train` calls `nanovlm.train.run.run_training`; the loop itself is
`nanovlm.train.loop.train(vlm_cfg, train_cfg, run_dir)`.
"""
