"""drifting_jax: drifting models trained with conservative, loss-based objectives."""

__version__ = "0.1.0"
