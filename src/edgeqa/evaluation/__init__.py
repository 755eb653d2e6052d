"""Evaluation: the metrics every model is scored by (`metrics`), one model on the held-out split (`evaluate`),
and the seed's experiment as one table (`retention`)."""
