"""shoprank: fine-tune language models to rank products, on Ray."""

__version__ = "0.1.0"
