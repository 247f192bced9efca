"""Where blocks run: Dask clients (local, a scheduler, Slurm) and Slurm job settings."""
