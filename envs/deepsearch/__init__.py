"""`deepsearch`: multi-hop search over a procedurally built fictional knowledge graph."""
