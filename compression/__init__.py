"""CMT-style compression of documents into memory slots, the memory bank, and retrieval keys."""
