"""ckl serving: the model server that owns the live memory state, its snapshots, and an HTTP client."""
