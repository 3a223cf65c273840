"""Tally: an event-sourced wallet and credit ledger service."""
