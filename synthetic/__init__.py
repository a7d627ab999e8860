"""Synthetic document streams: biographies with probe questions (bios.py) and filler text (filler.py)."""
