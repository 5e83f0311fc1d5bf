"""`python -m launcher CONFIG.yaml` / `torchrun -m launcher CONFIG.yaml`."""
