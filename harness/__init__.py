"""What tests, benchmarks and the demo share to run real peers: not part of the library.

Owns: ``processes`` (a peer as an OS process group, condition waits), ``netlab`` (emulated hosts:
network namespaces on a bridge, capped links, cuts) and ``averaging_peer`` (one averaging peer with
explicit fault options: NaN updates, a rogue that skips its own checks, fetch traces).
May import: :mod:`swarm` and the standard library; never :mod:`peers` (the roles) or benchmarks.
"""
