"""Training and export of dlwsi models (needs the ``[train]`` extra: torch, CompressAI)."""
