"""projector: trainable bridges from vision tokens to an LLM's embedding space (see issue 4)."""
