"""fedmq edge agent: the device side. Trains on local data and publishes model updates.

What the agent shares with the aggregator (protocol, codecs, transport, models) lives in
the `fedmq` package; this one holds only the device's service around it.
"""
