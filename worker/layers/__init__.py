"""Building blocks the model files compose. Tensor-parallel sharding lives here, not in models."""
