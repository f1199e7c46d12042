"""The one typed config tree of a run, and how it is filled.

Owns: ``schema`` (pydantic sections, ``extra="forbid"``; each component receives its own section)
and ``loading`` (defaults < YAML < ``SWARM_*`` variables < ``--set``; errors name the key).
May import: pydantic, yaml, :mod:`swarm.errors`, :mod:`swarm.net.multiaddrs` and the codec names of
:mod:`swarm.compression.registry`, none of which imports hivemind or torch: a bad key is reported
within a second, before the heavy imports.
"""
