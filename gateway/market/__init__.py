"""The market: tenants and their quotas, registered providers, the attestation directory, placement, the node client."""
