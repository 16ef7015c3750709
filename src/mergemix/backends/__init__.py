"""Model families behind one small interface; see :mod:`mergemix.backends.base`."""

from mergemix.backends.base import BACKENDS, Backend, get_backend, register_backend  # noqa: F401
