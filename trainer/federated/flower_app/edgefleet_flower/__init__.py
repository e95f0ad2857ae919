"""edgefleet's Flower app: the ServerApp and ClientApp entry points (thin)."""
