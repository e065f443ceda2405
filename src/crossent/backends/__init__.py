"""Backends: numeric primitives on ``(M, V)`` row blocks (see :mod:`crossent.backends.base`)."""
