"""The gated edge release: the absolute quality gate (`gate`)."""
