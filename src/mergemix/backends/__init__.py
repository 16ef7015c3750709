"""Model families behind one small interface; see :mod:`mergemix.backends.base`.

The built-in backends (smallcnn, clip, causal_lm) are imported on the first lookup of their name;
other packages add backends through the entry-point group ``mergemix.backends`` (see
:mod:`mergemix.plugins`).
"""

from mergemix.backends.base import (  # noqa: F401
    BACKENDS,
    Backend,
    backend_class,
    backend_names,
    get_backend,
    register_backend,
)
