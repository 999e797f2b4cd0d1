"""Model definitions: pure functions of (tokens, positions, KV cache, attention metadata)."""
