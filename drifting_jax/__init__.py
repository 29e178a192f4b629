"""drifting_jax: drifting models trained with conservative, loss-based objectives."""

from drifting_jax import platforms as _platforms

_platforms.skip_absent_tpu()  # before JAX starts a backend (see drifting_jax.platforms)

__version__ = "0.1.0"
