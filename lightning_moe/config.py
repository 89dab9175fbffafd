"""Structured configs: one host configuration, the DHT's, the local swarm's, the MoE layers' and swarm averaging's.

They are Hydra schemas (registered with :func:`register_configs`; the yaml files in
``lightning_moe/conf`` extend them), so a key that no code reads, or a value of the wrong type,
fails by name when Hydra composes the config. :meth:`HostConfig.check` and friends check ranges
and relations with errors that name the key, before anything starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Optional

WIRE_COMPRESSIONS = ("none", "float16", "uint8", "int8", "int4")  # lightning_moe.wire.COMPRESSIONS, without importing torch
MOE_COMPRESSIONS = (*WIRE_COMPRESSIONS, "auto")  # auto: chosen per host from its measured link (client/links.py)
REPLICA_AGGREGATES = ("centered_clip", "mean", "median", "trimmed_mean")  # lightning_moe.server.replica_sync.AGGREGATES
SWARM_AGGREGATES = ("centered_clip", "mean")  # lightning_moe.averaging.averager
MAX_MICRO_BATCHES = 16  # lightning_moe.client.pipeline.MAX_MICRO_BATCHES, without importing torch
BYZANTINE_MODES = ("none", "sign_flip", "scale", "noise", "stale")  # lightning_moe.server.byzantine.MODES


class ConfigError(ValueError):
    """A configuration value is wrong; the message names its key (e.g. ``host.port``)."""


def _help(text: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation (shown by ``lightning-moe host --help``)."""
    return field(metadata={"help": text}, **kwargs)


def valid_micro_batches(value: Any) -> bool:
    """Whether ``value`` is a valid ``micro_batches``: ``"auto"`` or an int in 1..``MAX_MICRO_BATCHES``."""
    return value == "auto" or (type(value) is int and 1 <= value <= MAX_MICRO_BATCHES)


def _require(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}, got {value!r}")


@dataclass
class HealthConfig:
    """How quickly experts and hosts are excluded after errors, and for how long."""

    window: float = 30.0
    min_failures: int = 3
    failure_rate: float = 0.5
    ban_time: float = 2.0
    max_ban_time: float = 60.0

    def __post_init__(self) -> None:
        if self.window <= 0 or self.min_failures < 1 or not 0 < self.failure_rate <= 1:
            raise ValueError(f"need window > 0, min_failures >= 1 and 0 < failure_rate <= 1, got {self}")
        if not 0 < self.ban_time <= self.max_ban_time:
            raise ValueError(f"need 0 < ban_time <= max_ban_time, got {self.ban_time}, {self.max_ban_time}")


@dataclass
class DHTConfig:
    """Where this process joins the swarm's DHT."""

    initial_peers: list[str] = _help("`host:port` of DHT nodes of the swarm; empty: train starts a local swarm, "
                                     "a host starts a new DHT", default_factory=list)
    host: Optional[str] = _help("interface the DHT node binds (UDP); null: loopback while every initial peer is on "
                                "loopback, else all interfaces (0.0.0.0)", default=None)
    port: int = _help("UDP port of the DHT node (0: any free port); others need it reachable", default=0)
    announce_host: Optional[str] = _help("address peers should use when it differs from dht.host (NAT, 0.0.0.0); "
                                         "null: dht.host, or when bound to all interfaces the local address that "
                                         "routes to the initial peers", default=None)
    secret: Optional[str] = _help("a private swarm's shared secret; null reads LIGHTNING_MOE_SECRET, unset there "
                                  "too: a public swarm", default=None)
    client_mode: Optional[bool] = _help("true: answer no DHT requests (behind NAT); false: answer them; null: a "
                                        "volunteer's node joining remote peers asks them to dial its port back and "
                                        "answers only if strangers reach it (a trainer's node is always a client)",
                                        default=None)
    verify_endpoints: bool = _help("serve a stranger's expert declaration only once its endpoint answered GET /info "
                                   "listing that expert (and in a private swarm proved the secret); checks are "
                                   "bounded in number, rate and time, answers cached per endpoint", default=True)

    def __post_init__(self) -> None:
        self.check()

    def check(self, prefix: str = "dht") -> None:
        _require(0 <= self.port <= 65535, f"{prefix}.port", "must be a port number (0 to 65535)", self.port)
        for peer in self.initial_peers:
            host, _, port = str(peer).rpartition(":")
            _require(bool(host) and port.isdigit() and 0 < int(port) <= 65535, f"{prefix}.initial_peers",
                     "must be a list of host:port", peer)


@dataclass
class HostLimits:
    """What a stranger can make a host spend: connections, header and body bytes, rows and time (README, Hostile input)."""

    max_connections: int = _help("open connections the host serves at once (an idle one costs no thread); more are "
                                 "closed on arrival (at most the process's open-files limit, raised to its hard limit)",
                                 default=16384)
    max_connections_per_address: int = _help("open connections from one client IP address", default=256)
    max_connections_per_network: int = _help("open connections from one client network (/24 for IPv4, /48 for IPv6); "
                                             "when all max_connections are taken, a newcomer from a network holding "
                                             "fewer evicts the oldest connection of the network holding the most",
                                             default=1024)
    idle_timeout: float = _help("seconds a connection may take for the next request's line and headers, from its "
                                "opening or its last answer (an idle keep-alive connection closes then)", default=10.0)
    body_timeout: float = _help("seconds a client may take to send a request's body once its headers are in "
                                "(slower: 408, connection closed)", default=60.0)
    request_timeout: Optional[float] = _help("seconds a request waits for its experts' answer (queue and compute) "
                                             "before it gets 504; null: no limit", default=300.0)
    max_header_bytes: int = _help("request line plus headers in bytes (more: 431, connection closed)", default=8192)
    max_body_mb: float = _help("largest request body in MiB (413 before it is read)", default=64.0)
    max_inflight_mb: Optional[float] = _help("MiB of request bodies read or served at once, host-wide: a request "
                                             "reserves its Content-Length before its body is read (none left: 503 "
                                             "with Retry-After); null: 4 x max_body_mb", default=None)
    max_rows_factor: int = _help("rows per request at most max_batch_size times this (checked from the wire header)",
                                 default=4)
    max_queue_wait: Optional[float] = _help("seconds the oldest queued work may have waited before new forwards get 503 "
                                            "with Retry-After (the host sheds load its trainers would give up on); "
                                            "null: never", default=2.0)

    def __post_init__(self) -> None:
        self.check()

    def check(self, prefix: str = "host.limits") -> None:
        """Ranges; raises :class:`ConfigError` naming the key."""
        for key in ("max_connections", "max_connections_per_address", "max_connections_per_network", "max_header_bytes",
                    "max_rows_factor"):
            _require(getattr(self, key) >= 1, f"{prefix}.{key}", "must be positive", getattr(self, key))
        for key in ("idle_timeout", "body_timeout", "max_body_mb"):
            _require(getattr(self, key) > 0, f"{prefix}.{key}", "must be positive", getattr(self, key))
        for key in ("request_timeout", "max_inflight_mb", "max_queue_wait"):
            _require(getattr(self, key) is None or getattr(self, key) > 0, f"{prefix}.{key}", "must be null or positive",
                     getattr(self, key))

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def max_inflight_bytes(self) -> int:
        """``max_inflight_mb`` in bytes (4 x the body limit when it is null)."""
        return 4 * self.max_body_bytes if self.max_inflight_mb is None else int(self.max_inflight_mb * 2**20)


@dataclass
class HostConfig:
    """What a volunteer hosts and how: used by `lightning-moe host`, the local swarm and ExpertHostCallback.

    :func:`~lightning_moe.volunteer.start_volunteer` reads every key; an
    :class:`~lightning_moe.server.ExpertHost` given ready backends reads the serving keys (where it listens and
    announces, ``limits``, ``compression``, ``kept_forwards_mb``, ``device``, ``update_period``, ``replicas`` and
    ``replica_*``: the averaging of a cell's replicas).
    """

    expert: Any = _help("factory of one expert: a `_target_` config (`_partial_: true`) or, in Python, a callable "
                        "(a volunteer needs one; an ExpertHost given its backends does not)", default=None)
    optimizer: Any = _help("factory `params -> Optimizer` for each expert (`_partial_: true`); null keeps experts frozen",
                           default=None)
    in_features: int = _help("the experts' input size (the model's hid_dim)", default=64)
    uid_prefix: str = _help("the grid's uid prefix (the DecentralizedMoE layer's uid_prefix)", default="ffn")
    num_layers: int = _help("MoE layers of the model: 1 serves uid_prefix; N serves cells of each of uid_prefix0 .. "
                            "uid_prefix{N-1} (model.moe_layers)", default=1)
    grid_size: list[int] = _help("the grid (the layer's grid_size)", default_factory=lambda: [4, 4])
    cells: Any = _help("N: host N grid cells, those with the fewest live replicas first (free cells first); "
                       "or a list of uids", default=4)
    replicas: int = _help("the swarm's replication target (hosts per cell): a joiner warns when it takes cells that "
                          "already have as many; above 1 it first downloads a busy cell's state from a live replica "
                          "(1: a busy cell starts from fresh weights, and replicas never average)", default=2)
    replica_average_period: float = _help("seconds between averagings of each served cell's parameters with its other "
                                          "live replicas (DHT), when host.replicas > 1; 0: never. 2 s held two "
                                          "replicas trained apart at 4.6% relative L2 (5 s: 7.8%, none: 20% after "
                                          "60 s) and kept churn within 1% of steady training, for 0.5 Mbit/s each way "
                                          "per cell of hid 64 (README, Replicas; the host logs its figure); raise it "
                                          "for large experts on slow links",
                                          default=2.0)
    replica_average_timeout: float = _help("seconds one replica may take to answer an averaging exchange; a replica "
                                           "that does not answer in time is skipped for that round", default=10.0)
    replica_aggregate: str = _help("how a cell's replicas' parameters are combined: centered_clip (the mean, with each "
                                   "replica's pull clipped to a radius this host measures itself, so one lying replica "
                                   "moves a cell a bounded amount, also with 2 replicas), mean (trusts every replica), "
                                   "or the coordinate-wise median or trimmed_mean (drops the lowest and highest quarter; "
                                   "robust from 3 replicas on; with 2 they are the mean)", default="centered_clip")
    replica_clip_min: float = _help("centered_clip: the least radius, relative to the cell's norm (a liar moves a "
                                    "cell at most half of it per exchange beyond what its own training moved it)",
                                    default=0.05)
    replica_clip_factor: float = _help("centered_clip: the radius is at least this many times how far the cell's own "
                                       "training moved it since its last averaging (two honest replicas that were "
                                       "equal then differ by at most both moves)", default=2.0)
    replica_max_distance: float = _help("refuse a replica whose parameters are farther than this from ours "
                                        "(||theirs - ours|| / ||ours||): the most one averaging can move a cell",
                                        default=0.5)
    max_batch_size: int = _help("rows per batch the host forms from all trainers' requests", default=4096)
    update_every: int = _help("0: step each expert's optimizer after every backward batch; N: after N samples", default=0)
    host: Optional[str] = _help("interface the HTTP server binds (0.0.0.0: all); null: as dht.host would (loopback "
                                "while every DHT peer is on loopback, else all)", default=None)
    port: int = _help("HTTP port (0: any free port); trainers need it reachable", default=0)
    announce_host: Optional[str] = _help("address trainers should use when it differs from host.host; null: host.host, "
                                         "or when bound to all interfaces the local address that routes to the DHT "
                                         "peers", default=None)
    announce_port: Optional[int] = _help("port trainers should use when it differs from host.port (a port forward, "
                                         "a proxy)", default=None)
    update_period: float = _help("seconds between DHT declarations (records live two periods)", default=10.0)
    relay: bool = _help("a host that strangers reach relays for hosts behind NAT (bounded; false: never)", default=True)
    hole_punch: bool = _help("a host served through a relay answers trainers that call it often and ask for a direct "
                             "path: both connect at once through their NATs (TCP simultaneous open, bounded per "
                             "address and in all); false: always through the relay", default=True)
    limits: HostLimits = _help("what a stranger can make the host spend (the host.limits.* keys)",
                               default_factory=HostLimits)
    kept_forwards_mb: float = _help("MiB of forward graphs kept for their backward, so a backward needs no second "
                                    "forward and no inputs resent (0: recompute every forward)", default=512.0)
    seed: Optional[int] = _help("seeds the experts' initial weights and the choice of free cells", default=None)
    compression: Optional[str] = _help("compression of the host's answers (none, float16, uint8, int8, int4); "
                                       "null: as each request came", default=None)
    dtype: str = _help("the experts' dtype: float32, float64, bfloat16 or float16", default="float32")
    device: Optional[str] = _help("where the experts compute (cpu, cuda, cuda:1); null: cpu, or the trainer's "
                                  "device under ExpertHostCallback", default=None)
    num_threads: Optional[int] = _help("the process's torch threads while the volunteer runs (torch.set_num_threads; "
                                       "under ExpertHostCallback the trainer's too); null: unchanged", default=None)
    checkpoint_dir: Optional[str] = _help("save the experts here every checkpoint_every seconds and at exit; "
                                          "reload them on start (null: no host checkpoints)", default=None)
    checkpoint_every: float = _help("seconds between host checkpoints", default=300.0)
    stats_every: float = _help("seconds between one-line stats reports in the log (0: none)", default=60.0)
    delay: float = _help("extra seconds per batch (a slow volunteer, for tests and demos)", default=0.0)
    fault_rate: float = _help("probability that a batch an expert computes fails with an error (a flaky volunteer, "
                              "for tests and demos; the start-up check is exempt)", default=0.0)
    byzantine: str = _help("a lying volunteer, for tests and demos: none, sign_flip (answers -y), scale (10 y), noise "
                           "(y plus noise of its own size) or stale (answers with its weights of when it started); "
                           "forward outputs and backward input gradients alike", default="none")
    byzantine_rate: float = _help("the share of its answers (batches) a lying volunteer alters", default=1.0)
    grad_clip: float = _help("each backward request's output-gradient rows are clipped to this many times the expert's "
                             "typical row norm (a lower median over trainer addresses), so one trainer's gradients "
                             "move an expert a bounded amount (16: 4 cost the example 3% val bpc); 0: no clipping",
                             default=16.0)

    def __post_init__(self) -> None:
        if isinstance(self.limits, Mapping):  # from yaml, or a mapping in Python
            self.limits = to_dataclass(self.limits, HostLimits)
        self.check(volunteer=False)

    def check(self, prefix: str = "host", volunteer: bool = True) -> None:
        """Ranges and relations, and with ``volunteer`` what a volunteer needs too (an expert factory); raises
        :class:`ConfigError` naming the key."""
        _require(len(self.grid_size) >= 1 and all(int(g) >= 1 for g in self.grid_size), f"{prefix}.grid_size",
                 "must be a non-empty list of positive sizes", self.grid_size)
        num_cells = 1
        for size in self.grid_size:
            num_cells *= int(size)
        if isinstance(self.cells, int) and not isinstance(self.cells, bool):
            _require(1 <= self.cells <= num_cells, f"{prefix}.cells", f"must be between 1 and {num_cells} (the grid's cells)",
                     self.cells)
        else:
            _require(isinstance(self.cells, (list, tuple)) and len(self.cells) > 0, f"{prefix}.cells",
                     "must be a number of cells or a non-empty list of uids", self.cells)
            valid = {uid for layer in self.layer_prefixes() for uid in grid_uids(layer, self.grid_size)}
            unknown = [uid for uid in self.cells if uid not in valid]
            _require(not unknown, f"{prefix}.cells",
                     f"lists uids outside the grids {self.layer_prefixes()}{list(self.grid_size)}", unknown)
        _require(self.in_features >= 1, f"{prefix}.in_features", "must be positive", self.in_features)
        _require(self.num_layers >= 1, f"{prefix}.num_layers", "must be positive", self.num_layers)
        _require(0 <= self.fault_rate <= 1, f"{prefix}.fault_rate", "must be in [0, 1]", self.fault_rate)
        _require(self.max_batch_size >= 1, f"{prefix}.max_batch_size", "must be positive", self.max_batch_size)
        _require(isinstance(self.limits, HostLimits), f"{prefix}.limits", "must be a HostLimits", self.limits)
        self.limits.check(f"{prefix}.limits")
        _require(self.update_every >= 0, f"{prefix}.update_every", "must be 0 or positive", self.update_every)
        _require(self.kept_forwards_mb >= 0, f"{prefix}.kept_forwards_mb", "must be 0 or positive", self.kept_forwards_mb)
        _require(0 <= self.port <= 65535, f"{prefix}.port", "must be a port number (0 to 65535)", self.port)
        from lightning_moe.dht.records import MAX_TTL

        _require(0 < self.update_period <= MAX_TTL / 2, f"{prefix}.update_period",
                 f"must be positive and at most {MAX_TTL / 2:g} s (declarations live two periods; DHT nodes refuse "
                 f"expirations more than {MAX_TTL:g} s ahead)", self.update_period)
        _require(self.compression is None or self.compression in WIRE_COMPRESSIONS, f"{prefix}.compression",
                 f"must be null or one of {list(WIRE_COMPRESSIONS)}", self.compression)
        _require(self.dtype in ("float32", "float64", "bfloat16", "float16"), f"{prefix}.dtype",
                 "must be float32, float64, bfloat16 or float16", self.dtype)
        _require(self.num_threads is None or self.num_threads >= 1, f"{prefix}.num_threads", "must be null or positive",
                 self.num_threads)
        _require(self.checkpoint_every > 0, f"{prefix}.checkpoint_every", "must be positive", self.checkpoint_every)
        _require(self.replicas >= 1, f"{prefix}.replicas", "must be positive", self.replicas)
        _require(self.replica_average_period >= 0, f"{prefix}.replica_average_period", "must be 0 (never) or positive",
                 self.replica_average_period)
        _require(self.replica_average_timeout > 0, f"{prefix}.replica_average_timeout", "must be positive",
                 self.replica_average_timeout)
        _require(self.replica_aggregate in REPLICA_AGGREGATES, f"{prefix}.replica_aggregate",
                 f"must be one of {list(REPLICA_AGGREGATES)}", self.replica_aggregate)
        _require(self.replica_max_distance > 0, f"{prefix}.replica_max_distance", "must be positive",
                 self.replica_max_distance)
        _require(0 < self.replica_clip_min <= self.replica_max_distance, f"{prefix}.replica_clip_min",
                 f"must be positive and at most {prefix}.replica_max_distance={self.replica_max_distance:g}",
                 self.replica_clip_min)
        _require(self.replica_clip_factor >= 0, f"{prefix}.replica_clip_factor", "must be 0 or positive",
                 self.replica_clip_factor)
        _require(self.stats_every >= 0, f"{prefix}.stats_every", "must be 0 or positive", self.stats_every)
        _require(self.delay >= 0, f"{prefix}.delay", "must be 0 or positive", self.delay)
        _require(self.byzantine in BYZANTINE_MODES, f"{prefix}.byzantine", f"must be one of {list(BYZANTINE_MODES)}",
                 self.byzantine)
        _require(0 <= self.byzantine_rate <= 1, f"{prefix}.byzantine_rate", "must be in [0, 1]", self.byzantine_rate)
        _require(self.grad_clip == 0 or self.grad_clip >= 1, f"{prefix}.grad_clip", "must be 0 (off) or at least 1",
                 self.grad_clip)
        if volunteer:
            _require(self.expert is not None, f"{prefix}.expert", "must be a factory of an expert", self.expert)

    def layer_prefixes(self) -> list[str]:
        """The uid prefix of each MoE layer it serves."""
        return layer_prefixes(self.uid_prefix, self.num_layers)

    def make_expert(self) -> Callable[[], Any]:
        """The expert factory, instantiated from its `_target_` config if it is one."""
        return _instantiate(self.expert)

    def make_optimizer(self) -> Callable[..., Any] | None:
        """The optimizer factory (None: frozen experts)."""
        return None if self.optimizer is None else _instantiate(self.optimizer)


@dataclass
class LocalSwarmConfig:
    """A swarm on this machine (:class:`lightning_moe.swarm.LocalSwarm`): the one `lightning-moe train` starts when
    dht.initial_peers is empty, and tests'. Its hosts serve the `host` group's experts, except for these keys."""

    num_hosts: int = _help("host processes to start; host i serves every num_hosts-th cell of each layer's grid from "
                           "cell i (and from the replicas - 1 cells before it), with seed host.seed + i", default=2)
    replicas: int = _help("local hosts that serve each cell at start (host.replicas is what joiners aim for); they start "
                          "in waves: a cell starts on one host and its other replicas adopt that host's state, so they "
                          "start equal", default=1)
    num_threads: Optional[int] = _help("each host's torch threads, replacing host.num_threads (the hosts share this "
                                       "machine); null: torch's default", default=1)
    update_period: float = _help("seconds between each host's DHT declarations, replacing host.update_period",
                                 default=5.0)
    start_timeout: float = _help("seconds to wait for every host to serve", default=120.0)
    host_delays: list[float] = _help("extra seconds per batch for each of the first hosts, e.g. [2.0] makes host 0 a "
                                     "slow volunteer (the others keep host.delay)", default_factory=list)
    host_byzantine: list[str] = _help("host.byzantine for each of the first hosts, e.g. [sign_flip, none, none, scale] "
                                      "makes hosts 0 and 3 lying volunteers (the others keep host.byzantine)",
                                      default_factory=list)

    def __post_init__(self) -> None:
        self.check()

    def check(self, prefix: str = "local_swarm") -> None:
        """Ranges and relations; raises :class:`ConfigError` naming the key."""
        _require(self.num_hosts >= 1, f"{prefix}.num_hosts", "must be at least 1 (a swarm needs a host)", self.num_hosts)
        _require(1 <= self.replicas <= self.num_hosts, f"{prefix}.replicas",
                 f"must be between 1 and {prefix}.num_hosts={self.num_hosts}", self.replicas)
        _require(self.num_threads is None or self.num_threads >= 1, f"{prefix}.num_threads", "must be null or positive",
                 self.num_threads)
        from lightning_moe.dht.records import MAX_TTL

        _require(0 < self.update_period <= MAX_TTL / 2, f"{prefix}.update_period",
                 f"must be positive and at most {MAX_TTL / 2:g} s (declarations live two periods)", self.update_period)
        _require(self.start_timeout > 0, f"{prefix}.start_timeout", "must be positive", self.start_timeout)
        _require(all(d >= 0 for d in self.host_delays), f"{prefix}.host_delays", "must be seconds >= 0", self.host_delays)
        _require(len(self.host_delays) <= self.num_hosts, f"{prefix}.host_delays",
                 f"must have at most {prefix}.num_hosts={self.num_hosts} delays", self.host_delays)
        _require(all(mode in BYZANTINE_MODES for mode in self.host_byzantine), f"{prefix}.host_byzantine",
                 f"must list modes of {list(BYZANTINE_MODES)}", self.host_byzantine)
        _require(len(self.host_byzantine) <= self.num_hosts, f"{prefix}.host_byzantine",
                 f"must have at most {prefix}.num_hosts={self.num_hosts} modes", self.host_byzantine)


@dataclass
class CharLMConfig:
    """Schema of the `model=char_lm` group: :class:`lightning_moe.lightning.char_lm.CharLM`, the example model."""

    _target_: str = "lightning_moe.lightning.char_lm.CharLM"
    hid_dim: int = _help("model width (the experts' in/out size)", default=64)
    seq_len: int = _help("longest sequence (the data's seq_len)", default=64)
    num_heads: int = _help("attention heads", default=4)
    lr: float = _help("AdamW learning rate of the model's own parameters (the experts learn on their hosts)", default=3e-3)
    aux_loss_weight: float = _help("weight of the layers' load-balancing loss", default=0.01)
    moe_layers: int = _help("mixture layers, each residual (uid prefixes ffn for one, else ffn0, ffn1, ...)", default=1)
    uid_prefix: str = _help("the grid prefix the layers' prefixes derive from (moe.uid_prefix)", default="ffn")
    micro_batches: Any = _help("the batch is split into this many micro-batches that flow through the mixture layers at "
                               "once, so one micro-batch's expert calls overlap another's (lightning_moe.MoEStack; the "
                               "same gradients as 1, which does not pipeline); auto: 2 while a layer calls a host over "
                               "a slow link (the rule of moe.compression=auto), else 1", default="auto")

    def check(self, prefix: str = "model") -> None:
        """Ranges; raises :class:`ConfigError` naming the key."""
        for key in ("hid_dim", "seq_len", "num_heads", "moe_layers"):
            _require(getattr(self, key) >= 1, f"{prefix}.{key}", "must be positive", getattr(self, key))
        _require(valid_micro_batches(self.micro_batches), f"{prefix}.micro_batches",
                 f"must be auto or an integer in 1..{MAX_MICRO_BATCHES}", self.micro_batches)


@dataclass
class MoEConfig:
    """Keys every `moe` option has."""

    _target_: str = "lightning_moe.LocalMoE"
    in_features: int = 64
    grid_size: list[int] = field(default_factory=lambda: [4, 4])
    uid_prefix: str = "ffn"
    k_best: int = 4


@dataclass
class DecentralizedMoEConfig(MoEConfig):
    """Schema of the `moe=decentralized` group: typed keys of :class:`lightning_moe.DecentralizedMoE`."""

    _target_: str = "lightning_moe.DecentralizedMoE"
    k_min: int = 1
    forward_timeout: Optional[float] = 30.0
    timeout_after_k_min: Optional[float] = 1.0
    backward_k_min: int = 1
    backward_timeout: Optional[float] = 30.0
    dht: Any = "${dht}"  # the run's `dht` group, checked there (a typed node cannot hold an interpolation)
    compression: str = "auto"
    cache_ttl: float = 5.0
    jitter: float = 0.0
    backward_timeout_after_k_min: Optional[float] = 1.0
    max_retries: int = 2
    allow_zero_outputs: bool = False
    max_call_bytes: int = 128 * 1024
    health: HealthConfig = field(default_factory=HealthConfig)
    slow_wait_budget: float = 0.1
    latency_margin: float = 1.0
    hole_punch: bool = True
    spot_check_rate: float = 0.02
    spot_check_tolerance: float = 0.1
    liar_ban_time: float = 600.0
    poison: Optional[float] = None
    rows_per_host: bool = False


@dataclass
class LocalMoEConfig(MoEConfig):
    """Schema of the `moe=local` group: :class:`lightning_moe.LocalMoE`, the baseline."""

    experts: Any = None


@dataclass
class AveragingConfig:
    """How the trainers of a run average their dense parameters: :class:`lightning_moe.averaging.SwarmAveraging`."""

    run_id: str = _help("trainers with the same run id average together", default="default")
    every_n_steps: int = _help("optimizer steps of this trainer between the exchanges it initiates", default=10)
    client_mode: Optional[bool] = _help("true: initiate exchanges, answer none (no server; not declared in the DHT); "
                                        "false: answer too; null: answer only if DHT peers can dial the server's port "
                                        "back (behind a home NAT they cannot)", default=None)
    host: Optional[str] = _help("interface the averaging server (TCP) binds; null: dht.host, and if that is null too "
                                "as the DHT node would (loopback for loopback peers, else all interfaces)", default=None)
    port: int = _help("TCP port of the averaging server (0: any free port)", default=0)
    announce_host: Optional[str] = _help("address peers are told; null: dht.announce_host, else as the DHT node would",
                                         default=None)
    max_distance: float = _help("refuse a peer whose parameters are farther than this from ours (||peer - ours|| / "
                                "||ours||) and leave it out for ban_seconds", default=0.5)
    aggregate: str = _help("how a pair's parameters are combined: centered_clip (the pair's mean, with the peer's pull "
                           "clipped to a radius this trainer measures itself, so a lying peer moves it a bounded "
                           "amount) or mean (trusts every peer)", default="centered_clip")
    clip_min: float = _help("centered_clip: the least radius, relative to the parameters' norm (a liar moves a "
                            "trainer at most half of it per exchange beyond what its own training moved it)",
                            default=0.05)
    clip_factor: float = _help("centered_clip: the radius is at least this many times how far this trainer's own "
                               "training moved its parameters since its last averaging", default=2.0)
    ban_seconds: float = _help("seconds a refused peer is left out", default=60.0)
    timeout: float = _help("seconds one exchange or download may take (a dead peer costs one exchange)", default=10.0)
    compression: str = _help("the parameters on the wire: none or float16", default="none")
    load_state_from_peers: bool = _help("before its first step a trainer downloads the parameters of the most "
                                        "advanced peer", default=True)
    adopt_step: bool = _help("the downloaded step becomes this trainer's run step (logged as averaging/run_step, "
                             "declared to peers); trainer.global_step and max_steps still count this trainer's steps",
                             default=True)
    declare_ttl: float = _help("seconds a DHT declaration lives (renewed every third of it)", default=30.0)
    outer_lr: float = _help("1 with outer_momentum 0: plain averaging; otherwise a DiLoCo-style outer step "
                            "(Nesterov on the pseudo-gradient anchor - pair mean), e.g. 0.7", default=1.0)
    outer_momentum: float = _help("the outer step's momentum, in [0, 1), e.g. 0.9", default=0.0)

    def __post_init__(self) -> None:
        self.check()

    def check(self, prefix: str = "swarm_averaging") -> None:
        """Ranges; raises :class:`ConfigError` naming the key."""
        _require(isinstance(self.run_id, str) and 0 < len(self.run_id) <= 200, f"{prefix}.run_id",
                 "must be a non-empty string of at most 200 characters", self.run_id)
        _require(self.every_n_steps >= 1, f"{prefix}.every_n_steps", "must be at least 1", self.every_n_steps)
        _require(0 <= self.port <= 65535, f"{prefix}.port", "must be a port number (0 to 65535)", self.port)
        _require(self.max_distance > 0, f"{prefix}.max_distance", "must be positive", self.max_distance)
        _require(self.aggregate in SWARM_AGGREGATES, f"{prefix}.aggregate", f"must be one of {list(SWARM_AGGREGATES)}",
                 self.aggregate)
        _require(0 < self.clip_min <= self.max_distance, f"{prefix}.clip_min",
                 f"must be positive and at most {prefix}.max_distance={self.max_distance:g}", self.clip_min)
        _require(self.clip_factor >= 0, f"{prefix}.clip_factor", "must be 0 or positive", self.clip_factor)
        _require(self.ban_seconds >= 0, f"{prefix}.ban_seconds", "must be 0 or positive", self.ban_seconds)
        _require(self.timeout > 0, f"{prefix}.timeout", "must be positive", self.timeout)
        _require(self.compression in ("none", "float16"), f"{prefix}.compression", "must be none or float16",
                 self.compression)
        from lightning_moe.dht.records import MAX_TTL

        _require(0 < self.declare_ttl <= MAX_TTL, f"{prefix}.declare_ttl",
                 f"must be positive and at most {MAX_TTL:g} s (DHT nodes refuse longer expirations)", self.declare_ttl)
        _require(self.outer_lr > 0, f"{prefix}.outer_lr", "must be positive", self.outer_lr)
        _require(0 <= self.outer_momentum < 1, f"{prefix}.outer_momentum", "must be in [0, 1)", self.outer_momentum)


@dataclass
class SwarmAveragingCallbackConfig:
    """Schema of the `callbacks/swarm_averaging` preset: the callback with its AveragingConfig and the run's dht."""

    _target_: str = "lightning_moe.averaging.SwarmAveraging"
    _recursive_: bool = False
    config: AveragingConfig = field(default_factory=AveragingConfig)
    dht: Any = "${dht}"  # the run's `dht` group, checked there


def check_moe(moe: Any) -> None:
    """Ranges of the `moe` group (types are the schema's job); raises ConfigError naming the key."""
    k_best = int(moe.k_best)
    _require(k_best >= 1, "moe.k_best", "must be positive", k_best)
    _require(all(int(g) >= 1 for g in moe.grid_size) and len(moe.grid_size) >= 1, "moe.grid_size",
             "must be a non-empty list of positive sizes", list(moe.grid_size))
    if "k_min" in moe:
        _require(1 <= moe.k_min <= k_best, "moe.k_min", f"must be between 1 and moe.k_best={k_best}", moe.k_min)
        _require(moe.compression in MOE_COMPRESSIONS, "moe.compression", f"must be one of {list(MOE_COMPRESSIONS)}",
                 moe.compression)
        for key in ("forward_timeout", "backward_timeout", "timeout_after_k_min"):
            _require(moe[key] is None or moe[key] > 0, f"moe.{key}", "must be null or positive", moe[key])
        _require(moe.cache_ttl >= 0, "moe.cache_ttl", "must be 0 or positive", moe.cache_ttl)
        _require(moe.max_retries >= 0, "moe.max_retries", "must be 0 or positive", moe.max_retries)
        _require(moe.max_call_bytes >= 1, "moe.max_call_bytes", "must be positive", moe.max_call_bytes)
        _require(0 <= moe.slow_wait_budget < 1, "moe.slow_wait_budget", "must be in [0, 1)", moe.slow_wait_budget)
        _require(moe.latency_margin >= 0, "moe.latency_margin", "must be 0 or positive", moe.latency_margin)
        _require(0 <= moe.spot_check_rate <= 0.5, "moe.spot_check_rate", "must be in [0, 0.5]", moe.spot_check_rate)
        _require(0 < moe.spot_check_tolerance < 1, "moe.spot_check_tolerance", "must be in (0, 1)",
                 moe.spot_check_tolerance)
        _require(moe.liar_ban_time > 0, "moe.liar_ban_time", "must be positive", moe.liar_ban_time)
        _require(moe.poison is None or moe.poison > 0, "moe.poison", "must be null or positive", moe.poison)
        try:
            HealthConfig(**moe.health)
        except ValueError as e:
            raise ConfigError(f"moe.health: {e}") from None


def layer_prefixes(uid_prefix: str, num_layers: int) -> list[str]:
    """The uid prefixes of a model's MoE layers: ``[ffn]`` for one layer, ``[ffn0, ffn1, ...]`` for several."""
    return [uid_prefix] if num_layers == 1 else [f"{uid_prefix}{i}" for i in range(num_layers)]


def grid_uids(uid_prefix: str, grid_size: Any) -> list[str]:
    """Every uid of a grid, e.g. ``ffn.0.0 .. ffn.3.3`` for prefix ``ffn`` and grid ``(4, 4)``."""
    uids = [uid_prefix]
    for size in grid_size:
        uids = [f"{uid}.{i}" for uid in uids for i in range(int(size))]
    return uids


def to_dataclass(node: Any, schema: type) -> Any:
    """``node`` (a DictConfig, a mapping or already a ``schema``) as a checked ``schema`` instance."""
    if isinstance(node, schema):
        return node
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, Mapping):
        raise ConfigError(f"expected a {schema.__name__} or a mapping, got {type(node).__name__}")
    known = {f.name for f in fields(schema)}
    unknown = sorted(set(node) - known)
    if unknown:
        raise ConfigError(f"{schema.__name__} has no key {unknown[0]!r} (keys: {sorted(known)})")
    return schema(**node)


def describe(schema: type, prefix: str, values: Mapping[str, Any] | None = None) -> str:
    """Two lines per key of ``schema``: its name and value (from ``values``, else the default), and its help."""
    lines = []
    for f in fields(schema):
        if "help" not in f.metadata:
            continue
        if values is not None and f.name in values:
            value = values[f.name]
        else:
            value = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(f.default_factory):  # a nested group: its own keys, under this one's name
            lines.append(describe(f.default_factory, f"{prefix}.{f.name}", value if isinstance(value, Mapping) else None))
            continue
        lines.append(f"  {prefix}.{f.name} = {value!r}\n      {f.metadata['help']}")
    return "\n".join(lines)


def _instantiate(spec: Any) -> Any:
    if callable(spec):
        return spec
    import hydra

    return hydra.utils.instantiate(spec)


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (the yaml files of each group extend them)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="host", name="host_schema", node=HostConfig)
    store.store(group="dht", name="dht_schema", node=DHTConfig)
    store.store(group="local_swarm", name="local_swarm_schema", node=LocalSwarmConfig)
    store.store(group="model", name="char_lm_schema", node=CharLMConfig)
    store.store(group="moe", name="decentralized_schema", node=DecentralizedMoEConfig)
    store.store(group="moe", name="local_schema", node=LocalMoEConfig)
    store.store(group="callbacks", name="swarm_averaging_schema", node=SwarmAveragingCallbackConfig,
                package="callbacks.swarm_averaging")
