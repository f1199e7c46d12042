"""swarm: train one shared model together over the internet, peer to peer.

The library is layered like hivemind, which it builds on:
network (DHT, multiaddrs, identity) -> data and model -> training (hivemind.Optimizer) -> checkpoints.
It never parses argv, never exits the process and never configures logging; see ``peers/`` for that.
"""

__version__ = "0.1.0"
