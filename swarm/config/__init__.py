"""The one typed config tree of a run, and how it is filled.

Owns: ``schema`` (pydantic sections, ``extra="forbid"``; each component receives its own section),
``loading`` (defaults < YAML < ``SWARM_*`` variables < ``--set``; errors name the key) and
``multiaddrs`` (parsing and checking the peer addresses a user gives: they are config values).
May import: pydantic, yaml, multiaddr, :mod:`swarm.errors` and the codec names of
:mod:`swarm.compression.registry`, none of which imports hivemind or torch: a bad key is reported
within a second, before the heavy imports. Everything else in swarm may import it.
"""
