"""VRAMancer replication."""
