"""VRAMancer observability."""
