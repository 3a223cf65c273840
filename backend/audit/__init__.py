"""Audit: history, export, time travel and hash-chain verification."""
