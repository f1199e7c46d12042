"""Typed errors for the mistakes a user can make and the failures a peer can meet.

Entry points (``peers/``) turn each type into one line and a documented exit code.
"""


class SwarmError(Exception):
    """Base class: the message is meant to be shown to the user as one line."""


class ConfigError(SwarmError):
    """A config key is unknown, a value has the wrong type, or a multiaddr is malformed."""


class NetworkError(SwarmError):
    """None of the initial peers answered before the deadline."""


class DataError(SwarmError):
    """The data folder is missing, unreadable, or holds no usable text."""


class CheckpointError(SwarmError):
    """A checkpoint is corrupt, incompatible with the config, or would be overwritten."""


class MonitorError(SwarmError):
    """The monitor's history database is unusable or belongs to another run, or its port is taken."""


class ManifestError(SwarmError):
    """A run's manifest is not in the DHT, is forged or malformed, or this peer's config contradicts it."""


class ExportError(SwarmError):
    """An export folder is missing, unreadable or not a GPT-2 that swarm can run, ``--out`` is in the way,
    or the optional ``export`` extra (safetensors, transformers) is not installed."""


class BackgroundError(SwarmError):
    """A background thread of this peer died; its owner raises this (from the thread's own error) so
    that the peer stops instead of running on without it."""
