"""What the commands that run models (``align``, ``converge``, ``gate``) share, so none reaches into
another's internals: where the weights come from, sample tokens, quiet runs (megatron's warnings into a
log), JUnit reports, and a checkpoint's args re-laid out for another layout."""
