"""Every byte that crosses ranks goes through this package, so the ledger sees it."""
