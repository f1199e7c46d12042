"""Fault-tolerant decentralized averaging over hivemind's libp2p transport.

Layers, bottom up:
- ``wire``: messages (hivemind's ``ExpertRequest``/``ExpertResponse`` with msgpack metadata) and
  tensor streaming with heartbeats;
- ``outbox``: what this peer offers to others in the current round, keyed and awaited;
- ``matchmaking``: a leader gathers the peers of a round into one group;
- ``allreduce``: reduce-scatter + all-gather + commit, where a dead peer's part is dropped by
  every survivor alike, so survivors stay identical;
- ``service``: the background event loop, RPC handlers and the blocking API the trainer calls;
- ``state_sync``: state records in the DHT, and downloading the agreed state (late joiners,
  stragglers, a minority after a split).
"""
