"""Tools that use a running service: vit-predict (a client) and vit-bench (load generator)."""
