"""Every built-in mechanism, imported for its registrations (``ttt_jax.registry``).

The core never imports these modules; ``registry.load_builtins`` imports this one the
first time a name is looked up. A new built-in mechanism adds its module here.
"""

# pylint: disable=unused-import

import ttt_jax.cct.steps  # noqa: F401
