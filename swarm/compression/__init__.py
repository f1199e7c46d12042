"""Compression of what peers send each other: codecs by name, error feedback, PowerSGD, a non-finite guard.

Owns: ``registry`` (the one list of codec names and the codecs they build; importable without
hivemind, so the config validates names fast), ``residuals`` (error feedback: what compression
dropped, re-sent next time), ``powersgd`` (rank-r averaging through two all-reduces), ``finite``
(the NaN/Inf guard) and ``plan`` (per tensor: which codec, with error feedback or PowerSGD).
May import: hivemind, torch and :mod:`swarm.errors`; nothing else of swarm.
"""
