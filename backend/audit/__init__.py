"""Audit: history, export, time travel and hash-chain verification (DESIGN.md section 7)."""
