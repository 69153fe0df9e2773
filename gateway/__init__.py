"""llorch gateway: the OpenAI-compatible HTTP facade, placement, the node client and receipt checking.

Imports node and ledger.
"""
