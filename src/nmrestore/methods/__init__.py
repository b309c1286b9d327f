"""Sparsification methods: each a typed config plus a handler registered with ``register_method``."""
