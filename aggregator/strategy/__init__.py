"""How updates become the next model: aggregation rules, server optimizers, central DP."""
