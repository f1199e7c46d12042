"""This peer on the network: identity, addresses, the DHT, and every DHT record the project uses.

Owns: ``identity`` (one RSA key: peer id and record signatures), ``dht``
(start with retries, shutdown, reachability), ``rejoin`` (the loop that pings the initial peers
to find the way back after a partition), ``keys`` (every DHT key, one table of who
writes and reads it), and one module per record kind with its schema and validators
(``metrics_record``, ``diloco_records``, ``refusals``, ``exclusion_record`` with the evidence it carries:
equivocation, and ``outlier_evidence``), what signed kinds share (``signed_record``),
the list of validators every node of a run runs (``validators``); ``manifest`` (a run's owner-signed
settings and a peer's config checked against them) and ``manifest_record`` (signing, its DHT record);
``certificate`` (the owner's signed admission of one peer id, with a role) and ``certificate_record``
(peers' certificates in the DHT), ``authorizer`` (a private run's DHT admits certified peers only) and
``admission`` (who may take part and as what, kept fresh from the DHT: what every service asks);
``direct`` (authenticated, encrypted TCP links between two peers beside libp2p, for bulk transfers).
May import: hivemind, ``cryptography``, :mod:`swarm.errors`, :mod:`swarm.loops`, :mod:`swarm.hivemind_private` and
:mod:`swarm.config` (its own section, :class:`~swarm.config.schema.NetworkConfig`; ``manifest`` reads the
whole tree, since it holds a run's shared settings) and :mod:`swarm.compression.registry` (codec names).
"""
