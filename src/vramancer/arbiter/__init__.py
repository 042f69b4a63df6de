"""VRAMancer arbiter."""
