"""VRAMancer memory."""
