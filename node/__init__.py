"""llorch node: the provider's libp2p host, attestation gossip, and the /llorch/infer/1 service.

Imports ledger and inference.
"""
