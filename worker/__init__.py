"""The worker: models, paged KV cache, model runner. Imports `kernels` and `common` only."""
