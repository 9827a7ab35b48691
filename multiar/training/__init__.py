"""Training: the LightningModule, `train(cfg)` wiring, callbacks, checkpoint I/O and loggers."""
