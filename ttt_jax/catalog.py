"""Every built-in mechanism, imported for its registrations (``ttt_jax.registry``).

The core never imports these modules; ``registry.load_builtins`` imports this one the
first time a name is looked up. A new built-in mechanism adds its module here.
"""

# pylint: disable=unused-import
import ttt_jax.cct.bench  # noqa: F401
import ttt_jax.cct.decode  # noqa: F401
import ttt_jax.cct.evals  # noqa: F401
import ttt_jax.cct.mixer  # noqa: F401
import ttt_jax.cct.objective  # noqa: F401
import ttt_jax.cct.steps  # noqa: F401
import ttt_jax.models.embeddings.token  # noqa: F401
import ttt_jax.models.ffn.swiglu  # noqa: F401
import ttt_jax.models.heads.linear  # noqa: F401
import ttt_jax.models.mixers.attention  # noqa: F401
import ttt_jax.models.mixers.ttt_linear  # noqa: F401
import ttt_jax.models.remat  # noqa: F401
import ttt_jax.models.residuals.mhc  # noqa: F401
import ttt_jax.models.residuals.plain  # noqa: F401
import ttt_jax.models.trunks.stacked  # noqa: F401
import ttt_jax.sdft.objective  # noqa: F401
import ttt_jax.training.objectives  # noqa: F401
