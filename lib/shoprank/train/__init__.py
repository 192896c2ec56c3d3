"""Training: the one loop (Ray Train + DeepSpeed), export, and Tune sweeps over it."""
