"""The money: prices, receipt checks, the double-entry postings and reconciliation of tickets against receipts."""
