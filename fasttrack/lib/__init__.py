"""What stages share: models, adapters, training, retrieval, generation, metrics, sources."""
