"""Data: featurization, task registry, readers, built-in corpus, tokenizer, Grain pipeline."""
