"""fedmq aggregator: the server side. Combines device updates into the next global model."""
