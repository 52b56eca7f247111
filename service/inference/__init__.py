"""Inference: the model registry and repository, one model version's pipeline, batching."""
