"""llorch node: the provider's libp2p host, attestation gossip, the /llorch/infer/1 and /llorch/ledger/1 services.

``wire/`` is what the gateway and the node both speak. Imports ledger and inference.
"""
