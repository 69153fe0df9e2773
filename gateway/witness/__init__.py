"""The witness: fetching, checking and cosigning every provider's ledger over /llorch/ledger/1."""
