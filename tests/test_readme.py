"""The README's loss-library example runs and means what it says."""

import pathlib
import re

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # make test-fast skips this module: it runs the README's examples


def test_readme_loss_example_runs():
  readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)
  assert namespace["loss"].shape == (8,)
  assert np.all(np.isfinite(namespace["grads"]))
  # The stated identity: the potential's gradient is minus the sharp field.
  import jax
  from drifting_jax import losses
  ns = namespace
  grad = jax.grad(lambda x: losses.log_kde_potential(x, ns["y_pos"], ns["y_neg"], kernel="laplace",
                                                     bandwidth=1.0).sum())(ns["x"])
  np.testing.assert_allclose(-grad, ns["v_sharp"], rtol=1e-3, atol=1e-6)
