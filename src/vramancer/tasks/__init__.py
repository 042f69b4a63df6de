"""VRAMancer tasks."""
