"""Running the model: jitted steps, buckets, generation loops."""
