"""Hydra configs for multiar; installed as the package multiar.conf."""
