"""Models: one way to load a pretrained encoder, the ranker, PEFT adapters."""
