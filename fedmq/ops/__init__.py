"""Operator tooling: certificates, device enrollment, signing keys (never on the hot path)."""
