"""Stage one: catalog embedding (Ray Data), the ANN index, the blend of signals."""
