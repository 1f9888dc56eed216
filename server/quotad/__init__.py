"""quotad: a per-end-user quota authority for AI products."""
