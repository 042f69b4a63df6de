"""VRAMancer models."""
