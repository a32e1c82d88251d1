"""Short convergence runs on megatron-core: trainer, variants (optimizer, FP8, resume), report."""
