"""What the swarm shows of itself: the metrics record each peer publishes (``metrics``), traffic
counters (``traffic``), and the monitor: ``collector`` (records -> swarm view), ``history`` (SQLite),
``prometheus``, ``web`` (dashboard, JSON API, CSV) and ``monitor`` (all of them, collecting every period).
May import: anything in :mod:`swarm` below it (net, config, train's status type); nothing imports it
but the peer roles.
"""
