"""llorch gateway: the one central part. Sub-packages by concern, wiring at the top.

  api/       the HTTP surface (OpenAI shapes, handlers, /metrics)
  market/    tenants, quotas, providers, directory, placement, node client
  books/     prices, receipt checks, postings, reconciliation
  witness/   the witness of every provider's ledger
  service.py the request flow across them; run.py, db.py, config.py and the CLIs wire everything together.

Imports node (its wire package and shared plumbing) and ledger.
"""
