"""One block on the compute device: plan, tiles, model, blend, write."""
