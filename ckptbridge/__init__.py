"""ckptbridge: convert checkpoints between HuggingFace and Megatron-Core, strictly and in one CPU process."""

__version__ = "0.1.0"
