"""VRAMancer web."""
