"""VRAMancer api.routers."""
