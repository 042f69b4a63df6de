"""VRAMancer cli."""
