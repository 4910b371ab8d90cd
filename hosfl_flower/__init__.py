"""hosfl-flower: hybrid-order split federated learning (HO-SFL) for the Flower framework."""

__version__ = "0.1.0"
