"""VRAMancer devices."""
