"""VRAMancer api."""
