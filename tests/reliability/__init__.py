"""Reliability: faults, bad input and untrusted files (issue 10)."""
