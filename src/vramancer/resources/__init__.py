"""VRAMancer resources."""
