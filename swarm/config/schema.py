"""The one typed config tree of a swarm run.

Each component receives only its own section. Sections that are optional turn their feature off
when set to ``null``. The tree is filled from YAML, ``SWARM_*`` environment variables and
``--set section.key=value`` overrides by :mod:`swarm.config.loading`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from swarm.compression.registry import (
    CODEC_NAMES,
    DEFAULT_ADAPTIVE_THRESHOLD,
    DEFAULT_SPARSE_BITS,
    DEFAULT_SPARSE_FRACTION,
    SPARSE_BITS,
)
from swarm.config.multiaddrs import parse_peer_multiaddr, split_peer_list


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def section_model(annotation) -> Optional[type[BaseModel]]:
    """The section a field holds (``Optional[Section]`` included), or None for a plain value."""
    for candidate in getattr(annotation, "__args__", None) or (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


class NetworkConfig(Section):
    """How this peer listens, announces itself and finds the swarm."""

    listen_host: str = Field("0.0.0.0", description="interface to listen on; 127.0.0.1 for local-only swarms")
    port: int = Field(0, ge=0, le=65535, description="TCP port; 0 picks a free one (set a fixed one to forward it)")
    announce_maddrs: list[str] = Field(default_factory=list, description="public addresses to announce (port forward)")
    initial_peers: list[str] = Field(default_factory=list, description="full multiaddrs of peers already in the swarm")
    client_mode: bool = Field(False, description="outbound connections only: others cannot reach this peer, so it "
                              "neither serves the DHT nor is pulled from (monitors); not needed behind NAT")
    use_auto_relay: Optional[bool] = Field(
        None, description="be reachable through a relay on the initial peers (behind NAT without a forwarded port); "
                          "null = decide at join: an initial peer dials this peer back, and the relay is used if that fails")
    identity_path: Optional[Path] = Field(None, description="private key file: keeps the peer id across restarts")
    bootstrap_timeout: float = Field(60.0, gt=0, description="seconds to keep retrying the initial peers")
    rejoin_period: float = Field(
        15.0, ge=0, description="seconds between pings to the initial peers, which bring this peer back into "
        "the DHT after its link was down (a DHT forgets peers that stop answering); 0 = off")

    @field_validator("initial_peers", "announce_maddrs", mode="before")
    @classmethod
    def _split(cls, value):
        return split_peer_list(value) if value is not None else []

    @field_validator("initial_peers")
    @classmethod
    def _validate_peers(cls, value: list[str]) -> list[str]:
        return [str(parse_peer_multiaddr(item)) for item in value]

    @property
    def host_maddrs(self) -> list[str]:
        family = "ip6" if ":" in self.listen_host else "ip4"
        return [f"/{family}/{self.listen_host}/tcp/{self.port}"]


class PeerConfig(Section):
    """Who this peer is; shown in logs and metrics."""

    certificate: Optional[Path] = Field(
        None, description="this peer's admission certificate (from the run's owner: `swarm admit`); it names the "
                          "run to join and this peer's role (institution, volunteer, ...); needed in a private run")
    display_name: Optional[str] = Field(None, max_length=64)
    organization: Optional[str] = Field(None, max_length=64)

    @model_validator(mode="before")
    @classmethod
    def _role_comes_from_the_certificate(cls, data):
        if isinstance(data, dict) and "role" in data:
            raise ValueError("peer.role is no longer a setting: a peer's role comes from its certificate "
                             "(`swarm admit --role institution` by the run's owner, then --certificate FILE)")
        return data


class ModelConfig(Section):
    """A byte-level GPT; the debug preset is about 1M parameters."""

    seq_len: int = Field(256, ge=8, le=8192)
    d_model: int = Field(384, ge=8)
    n_layers: int = Field(6, ge=1)
    n_heads: int = Field(6, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        return self


class DataConfig(Section):
    """Where the text comes from. It never leaves this peer."""

    path: Optional[Path] = Field(None, description="folder of text files; null = the embedded stdlib corpus")
    max_bytes: int = Field(16_000_000, gt=0, description="read at most this much text (memory cap)")
    heldout_fraction: float = Field(0.05, gt=0.0, lt=0.5, description="share of files kept for held-out loss")
    num_shards: int = Field(1, ge=1, description="split the training files into this many shards ...")
    shard_index: int = Field(0, ge=0, description="... and train on this one")

    @model_validator(mode="after")
    def _shard_in_range(self):
        if self.shard_index >= self.num_shards:
            raise ValueError(f"data.shard_index ({self.shard_index}) must be below data.num_shards ({self.num_shards})")
        return self


class OptimizerConfig(Section):
    """The inner optimizer that hivemind.Optimizer wraps."""

    name: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw8bit: bitsandbytes, for small GPUs")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: int = Field(0, ge=0, description="linear warm-up, counted in swarm epochs")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="clip local gradients to this norm; null = off")


class TrainingConfig(Section):
    """The local training loop."""

    batch_size: Union[Literal["auto"], int] = Field(
        "auto", description="samples per local step; auto: the largest power of two up to 64 whose step fits "
        "80% of the free memory, measured on this peer's device at start")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="bf16: the forward pass under bfloat16 autocast (less memory and faster on GPUs "
        "with bf16; parameters, gradients and what peers average stay fp32); auto: bf16 where CUDA supports it")
    target_batch_size: int = Field(4096, ge=1, description="swarm-wide samples per epoch (global batch)")
    max_epochs: Optional[int] = Field(None, ge=1, description="stop at this swarm epoch; null = until stopped")
    finish_timeout: float = Field(
        90.0, ge=0, description="after max_epochs, at most this long serving stragglers and settling on one final model "
        "(longer than averaging.averaging_timeout, which a straggler's last round can take)")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads; null = torch's default")
    eval_batches: int = Field(4, ge=1, description="held-out batches per evaluation")
    seed: int = 0


    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, value):
        if value != "auto" and value < 1:
            raise ValueError(f"expected auto or a whole number of at least 1, got {value}")
        return value


class BanConfig(Section):
    """Consequences of proven misbehaviour (:mod:`swarm.averaging.exclusions`): a reducer caught returning
    different results to different members, or a member clipped as an outlier round after round, is
    excluded from groups for ``base x 2^(n-1)`` seconds at its n-th offence, at most ``cap``.
    ``averaging.robust.ban: null``: the equivocated part is still dropped and outliers clipped, but no one
    is excluded."""

    base: float = Field(300.0, gt=0, le=86400, description="seconds the first offence excludes for")
    cap: float = Field(3600.0, gt=0, le=86400, description="the longest exclusion, in seconds, however many offences")
    outlier_rounds: Optional[int] = Field(
        3, ge=1, le=8, description="a member whose input two or more reducers clipped (signed reports) in this many "
        "rounds is excluded like an equivocating reducer; null = outliers are only clipped, never excluded")


class RobustConfig(Section):
    """Robust aggregation at each reducer of DiLoCo's all-reduce (CenteredClip, see
    :mod:`swarm.averaging.robust`): bounds what a member's input, or its declared weight, can do to the
    average while fewer than half the members are hostile. ``averaging.robust: null`` turns it off."""

    radius: float = Field(2.0, gt=0, le=100, description="clipping radius in units of the robust scale (median "
                          "distance of the members' inputs from their coordinate-wise median); raise it if honest "
                          "peers get clipped, lower it to give an attacker less room")
    iterations: int = Field(20, ge=1, le=1000, description="most CenteredClip steps per part (two suffice "
                            "when no input is clipped)")
    max_weight_ratio: float = Field(2.0, ge=1, description="no member counts with more than this x the median "
                                    "weight (samples) of its group; raise it for hardware of very uneven speed")
    ban: Optional[BanConfig] = Field(default_factory=BanConfig, description="exclude a reducer caught "
                                     "equivocating (signed proof), longer at each offence; null = never exclude")


class AveragingConfig(Section):
    """How peers combine their work: what both modes share (the mode's own settings are in the
    ``sync`` or ``diloco`` section)."""

    mode: Literal["sync", "diloco"] = Field(
        "sync", description="sync: average gradients every swarm epoch (hivemind.Optimizer); "
        "diloco: local steps, then average pseudo-gradients once per round (see the diloco section)"
    )
    compression: Literal[CODEC_NAMES] = Field("none", description="codec for what peers send each other")
    error_feedback: bool = Field(True, description="add what compression dropped to the next contribution")
    powersgd_rank: int = Field(4, ge=1, description="rank of the low-rank approximation (compression: powersgd)")
    adaptive_threshold: int = Field(
        DEFAULT_ADAPTIVE_THRESHOLD, ge=2,
        description="compression: adaptive sends tensors below this many elements in fp16, larger in 8-bit"
    )
    sparse_fraction: float = Field(
        DEFAULT_SPARSE_FRACTION, gt=0, le=1,
        description="compression: sparse sends this share of each part's values (the largest); error feedback "
        "sends the rest in later rounds"
    )
    sparse_bits: Literal[SPARSE_BITS] = Field(DEFAULT_SPARSE_BITS, description="compression: sparse quantizes "
                                              "each value it sends to this many bits (sign included)")
    chunk_timeout: float = Field(10.0, gt=0, description="silence after which a peer counts as gone mid-transfer "
                                 "(swarm's own averaging: DiLoCo rounds, state downloads, settling a sync run)")
    request_timeout: float = Field(3.0, gt=0, description="wait this long for a group leader's answer")
    averaging_timeout: float = Field(60.0, gt=0, description="give up on a round after this long")
    load_state_timeout: float = Field(120.0, gt=0, description="give up downloading state from a peer after this")
    direct: bool = Field(True, description="DiLoCo's round parts and state downloads go over a direct TCP connection "
                         "between peers that reach each other (authenticated with the peers' libp2p keys, encrypted "
                         "with AES-GCM), not through the libp2p daemon; a peer that cannot be reached directly is "
                         "fetched from over libp2p")
    direct_port: int = Field(0, ge=0, le=65535, description="TCP port of the direct links (on network.listen_host); "
                             "0 picks a free one. Behind a forwarded port, forward this one too and set it")
    robust: Optional[RobustConfig] = Field(
        default_factory=RobustConfig, description="robust aggregation in DiLoCo's all-reduce (sync mode's hivemind "
        "averagers do not have it); null = the plain weighted mean, for runs whose peers all trust each other")

    @model_validator(mode="after")
    def _sparse_needs_diloco(self) -> AveragingConfig:
        if self.compression == "sparse" and self.mode != "diloco":
            raise ValueError("averaging.compression: sparse is swarm's own payload format, which only DiLoCo's "
                             "all-reduce decodes (hivemind's sync averaging cannot): set averaging.mode: diloco")
        return self


class SyncConfig(Section):
    """``averaging.mode: sync``: hivemind.Optimizer's averaging rounds."""

    matchmaking_time: float = Field(5.0, gt=0, description="seconds to gather a group; 3-5 on LAN, 10-15 over WAN")
    average_state_every: int = Field(1, ge=1, description="also average parameters every this many epochs")


class DiLoCoConfig(Section):
    """DiLoCo rounds: ``inner_steps`` local AdamW steps, then one outer Nesterov step on the averaged
    pseudo-gradient (parameters at the start of the round minus local parameters)."""

    inner_steps: int = Field(50, ge=1, description="H: nominal local steps per peer per round (DiLoCo uses up to 500)")
    round_samples: Optional[int] = Field(
        None, ge=1, description="swarm-wide samples that close a round; null = inner_steps x batch_size x peers"
    )
    round_timeout: float = Field(600.0, gt=0, description="a round closes after this many seconds at the latest")
    outer_lr: float = Field(0.7, gt=0)
    outer_momentum: float = Field(0.9, ge=0, lt=1)
    refresh_period: float = Field(1.0, gt=0, description="seconds between progress reports to the DHT")
    overlap: bool = Field(
        False, description="average a round's pseudo-gradient in the background while the next round's inner steps "
        "run, and apply its outer step when it arrives, the progress made meanwhile kept (one-step-delayed, "
        "'eager' DiLoCo): no training time lost to the all-reduce on slow links; every peer of a run sets it alike"
    )
    join_warmup_steps: int = Field(
        50, ge=0, description="a peer that joins a run past its first round with a fresh inner optimizer ramps its inner "
        "learning rate up linearly over this many steps: a fresh AdamW's first steps are about 2x the warmed-up ones of "
        "the swarm, and robust averaging clipped such a late joiner as an outlier in its first rounds, 3 rounds in a row "
        "excluding it (in the debug config the excess fades over ~40 steps); 0 = no warm-up"
    )
    idle_refresh_period: Optional[float] = Field(
        10.0, gt=0, description="seconds between progress reports while the round is far from closing "
        "(every refresh_period from ~1.5 of them before its end); heartbeats are then judged against it, so a peer gone "
        "is noticed up to about 3 x this later. Each report costs ~29 KB on the wire with 3 peers, and more with every peer: "
        "reports every 10 s instead of every second cut an idle swarm's control traffic about 5x; "
        "null = report every refresh_period (a dead peer noticed within seconds)"
    )

    @model_validator(mode="after")
    def _idle_not_shorter(self) -> DiLoCoConfig:
        # only a value the user set is an error: the default yields to a longer refresh_period (the tracker
        # refreshes at the longer of the two)
        if ("idle_refresh_period" in self.model_fields_set and self.idle_refresh_period is not None
                and self.idle_refresh_period < self.refresh_period):
            raise ValueError(f"diloco.idle_refresh_period ({self.idle_refresh_period}) must be at least "
                             f"diloco.refresh_period ({self.refresh_period})")
        return self


class CheckpointConfig(Section):
    """Periodic and on-exit checkpoints, written atomically."""

    dir: Path = Path("checkpoints")
    every_epochs: int = Field(5, ge=1)
    resume: Union[Literal["auto"], bool] = Field(
        False,
        description="true: restore model, optimizer and epoch from dir/latest.pt (an error if it is missing); "
        "auto: restore it if it exists, else start fresh (what a restarted container wants); "
        "false: start fresh, and refuse to overwrite an existing checkpoint",
    )

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_choice(cls, value):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if not isinstance(value, bool):
            raise ValueError(f"expected true, false or auto, got {value!r}")
        return value


# The longest a metrics record may live: DHT nodes refuse one stored for longer (a year-long record
# could not be replaced by its owner's fresh ones); metrics.ttl may not exceed it.
MAX_METRICS_TTL = 3 * 3600.0


class MetricsConfig(Section):
    """The signed metrics record this peer publishes to the DHT (read by `swarm monitor` and `swarm status`)."""

    period: float = Field(10.0, gt=0, le=3600, description="seconds between records")
    ttl: float = Field(60.0, gt=0, le=MAX_METRICS_TTL,
                       description="a record expires this long after its last write; must exceed the period")

    @model_validator(mode="after")
    def _ttl_above_period(self):
        if self.ttl <= self.period:
            raise ValueError(f"metrics.ttl ({self.ttl:g}) must be above metrics.period ({self.period:g})")
        return self


class MonitorConfig(Section):
    """`swarm monitor`: collects every peer's metrics, keeps history, serves a dashboard, an API and /metrics."""

    period: float = Field(10.0, gt=0, le=3600, description="seconds between collections from the DHT")
    db_path: Path = Field(Path("swarm-monitor.sqlite"), description="SQLite history; a restarted monitor carries on")
    host: str = Field("127.0.0.1", description="dashboard interface; 0.0.0.0 shows it to the network (read-only)")
    port: int = Field(8470, ge=0, le=65535, description="dashboard port; 0 picks a free one")
    history_days: Optional[float] = Field(30.0, gt=0, description="forget history older than this; null = keep all")
    max_samples_per_second: float = Field(
        100_000.0, gt=0, description="flag a peer that claims more throughput than this as implausible"
    )


class SwarmConfig(Section):
    run_id: str = Field("swarm", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="peers of one run share it")
    network: NetworkConfig = NetworkConfig()
    peer: PeerConfig = PeerConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    training: TrainingConfig = TrainingConfig()
    averaging: AveragingConfig = AveragingConfig()
    sync: Optional[SyncConfig] = SyncConfig()  # may be null in DiLoCo mode
    diloco: Optional[DiLoCoConfig] = DiLoCoConfig()  # may be null in sync mode
    checkpoint: Optional[CheckpointConfig] = CheckpointConfig()
    metrics: Optional[MetricsConfig] = MetricsConfig()
    monitor: MonitorConfig = MonitorConfig()

    @model_validator(mode="after")
    def _mode_has_its_section(self):
        mode = self.averaging.mode
        if getattr(self, mode) is None:
            raise ValueError(f"averaging.mode is {mode}, so the {mode} section cannot be null")
        # hivemind: a request timeout at or above the matchmaking time can deadlock matchmaking
        if self.sync is not None and self.averaging.request_timeout >= self.sync.matchmaking_time:
            raise ValueError(f"averaging.request_timeout ({self.averaging.request_timeout:g}) must be below "
                             f"sync.matchmaking_time ({self.sync.matchmaking_time:g})")
        return self
