"""Logger builders with lmlab defaults (W&B offline without a login)."""
