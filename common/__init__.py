"""What every service shares: model config, tokenizer. Imports nothing else of ours."""
