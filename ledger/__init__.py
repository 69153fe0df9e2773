"""llorch ledger: canonical encoding, signatures, tickets and receipts, the SQLite store and the auditor.

Imports nothing else of llorch.
"""
