"""Audit: history, export, time travel, hash-chain verification, read models against the log, and the
Merkle tree over every event with its signed checkpoints."""
