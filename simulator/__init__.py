"""The fleet simulator: many agents, an aggregator and a private broker on one machine."""
