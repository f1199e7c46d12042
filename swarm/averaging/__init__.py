"""swarm's own fault-tolerant all-reduce over hivemind's libp2p transport (DiLoCo's outer step).

Layers, bottom up: ``wire`` (messages and tensor streaming with heartbeats), ``outbox`` (what this
peer offers its group, keyed and awaited), ``group``, ``matchmaking`` (a leader gathers a round's
peers), ``allreduce`` (reduce-scatter, all-gather, commit, repair: a part lost with its reducer is
fetched from a member that holds it, or dropped alike by every member that lacks it), ``service``
(the event loop, RPC handlers, blocking calls) and ``averager`` (the component a collaboration uses:
service, compression plan and counters behind one ``average()``).
May import: hivemind, torch, :mod:`swarm.errors`, :mod:`swarm.compression`, :mod:`swarm.net` and
:mod:`swarm.loops`.
"""
