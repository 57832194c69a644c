"""Thin drivers over common/, client/ and server/: the default simulation and the real benchmark."""
