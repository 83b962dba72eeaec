"""Everything a federated run needs, in one dataclass that travels as JSON.

The server sends it to every client inside each message's ``ConfigRecord`` (key
``mops-federated``), so a ClientApp needs nothing but the message: the same apps run in
Flower's simulation engine and as SuperNodes behind a real SuperLink.

What trains is a method of :mod:`mops.baselines` (``mops``, ``prompt``, ``prompt-equal``,
``uniform``, ``attempt``, ``lora``, ``lora-equal``, with ``NAME:key=value`` overrides), sized
from ``mixture`` (the MoPs budget) exactly as the centralized study sizes it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace

from mops.errors import UserError
from mops.federated.partition import SCHEMES
from mops.mixture import MixtureConfig
from mops.train import TrainConfig

STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam")
#: how a FedProx client pulls toward the round's global weights: ``loss`` adds mu/2 ||w - w_global||^2
#: to its loss (FedProx as published, where the local solver is SGD; AdamW normalises the term's
#: gradient with the loss's, and where it outweighs a prompt's small gradient, 6 to 59 times at
#: rate 1.0 and mu 0.01 in benchmarks/fedprox_gradients.py, the local steps answer the pull, not
#: the loss); ``decoupled`` leaves the loss alone and moves each tensor lr x mu of the way back
#: after every optimizer step, as AdamW decouples weight decay
PROXIMAL_FORMS = ("loss", "decoupled")
#: where the gate is pretrained on category labels: on each client in round 1, then averaged
#: with everything else (FedAvg of the gate); or once on the server, before round 1, on the
#: union of every client's pooled gate inputs and labels
GATE_INITS = ("clients", "server")
SCORE_SPLITS = ("test", "validation")
CONFIG_KEY = "mops-federated"
LORA_METHODS = ("lora", "lora-equal")
#: Flower's defaults, except FedAvgM's momentum (Flower: 0, which makes it plain FedAvg;
#: 0.9 is Hsu et al.'s usual value)
SERVER_DEFAULTS = {"fedavgm": {"server_lr": 1.0, "server_momentum": 0.9},
                   "fedadam": {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}}
SERVER_FLAGS = {"server_lr": "--server-lr", "server_momentum": "--server-momentum", "beta1": "--server-betas",
                "beta2": "--server-betas", "tau": "--server-tau"}


@dataclass
class FederatedConfig:
    base: str
    data: list[str]
    n_clients: int = 4
    rounds: int = 5
    local_steps: int = 10
    limit_per_source: int | None = None
    partition: str = "skew"
    total_examples: int = 5000
    skew_ratio: float = 15.0
    alpha: float = 0.5
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    proximal: str = "loss"  # one of PROXIMAL_FORMS
    min_clients: int | None = None  # None: more than half of the clients
    round_timeout: float = 3600.0  # seconds the server waits for a round's replies
    mixture: dict = field(default_factory=lambda: asdict(MixtureConfig()))  # the MoPs budget every method is sized from
    train: dict = field(default_factory=lambda: asdict(TrainConfig()))  # lr, gate_lr, batch_size, ... of each client
    test_examples: int = 160
    device: str = "cpu"
    method: str = "mops"  # a mops.baselines spec, NAME[:key=value,...]
    lora_rank: int = 8
    # the server's optimiser (fedavgm, fedadam); None: SERVER_DEFAULTS
    server_lr: float | None = None
    server_momentum: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    tau: float | None = None
    gate_init: str = "clients"
    eval_every_rounds: int = 1  # server-side validation every k rounds (and after the last)
    score_split: str = "test"  # scored once at the end: test for the table, validation for tuning
    split_seed: int | None = None  # data split, partition and scored examples; None: the training seed
    score_base: bool = True  # also score the base alone at the end (the same for every method on one base)

    @property
    def seed(self) -> int:
        """The training seed: initialisation, batch order, router noise."""
        return self.train["seed"]

    @property
    def data_seed(self) -> int:
        """The seed of the split, the partition and the held-out examples: runs with other
        training seeds keep the same clients and score the same examples."""
        return self.seed if self.split_seed is None else self.split_seed

    @property
    def required_clients(self) -> int:
        return self.min_clients if self.min_clients is not None else self.n_clients // 2 + 1

    def method_spec(self):
        from mops.baselines import parse_method

        return parse_method(self.method)

    @property
    def is_lora(self) -> bool:
        return self.method.partition(":")[0] in LORA_METHODS

    def mixture_config(self) -> MixtureConfig:
        """The MoPs budget (what ``--method mops`` trains; other methods are sized from it)."""
        return MixtureConfig(**self.mixture)

    def train_config(self) -> TrainConfig:
        """Each client's training settings, with the method's overrides (``lora:lora_lr=1e-3``)."""
        known = {f.name for f in fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in self.train.items() if k in known})
        return replace(config, **self.method_spec().training)

    def server_settings(self) -> dict:
        """The server optimiser's settings in effect (defaults filled in)."""
        given = {k: getattr(self, k) for k in SERVER_FLAGS if getattr(self, k) is not None}
        return SERVER_DEFAULTS.get(self.strategy, {}) | given

    def gate_trains_on_clients(self) -> bool:
        """Whether clients change the gate (and so send it back): not when the server
        pretrained it and ``gate_lr`` 0 keeps it frozen."""
        return not (self.gate_init == "server" and self.train_config().gate_lr == 0)

    def validate(self) -> None:
        spec = self.method_spec()  # one-line error for an unknown method or override
        if spec.name == "none":
            raise UserError("--method none trains nothing; expected one of mops, prompt, prompt-equal, uniform, "
                            "attempt, lora, lora-equal")
        if "steps" in spec.training:
            raise UserError(f"--method {self.method!r}: a federated run's steps are --rounds x --local-steps; drop steps=")
        self.train_config().validate()
        for name, flag in (("n_clients", "--federated"), ("rounds", "--rounds"), ("local_steps", "--local-steps"),
                           ("eval_every_rounds", "--eval-every-rounds"), ("lora_rank", "--lora-rank")):
            if getattr(self, name) < 1:
                raise UserError(f"{flag} {getattr(self, name)}: expected a positive whole number")
        if self.partition not in SCHEMES:
            raise UserError(f"--partition {self.partition!r}: expected one of {', '.join(SCHEMES)}")
        if self.strategy not in STRATEGIES:
            raise UserError(f"--strategy {self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if self.strategy == "fedprox" and not self.proximal_mu > 0:
            raise UserError(f"--proximal-mu {self.proximal_mu}: FedProx needs a positive proximal weight")
        self._validate_proximal()
        self._validate_server_optimiser()
        if self.gate_init not in GATE_INITS:
            raise UserError(f"--gate-init {self.gate_init!r}: expected one of {', '.join(GATE_INITS)}")
        if self.gate_init == "server":
            gate = self.mixture.get("gate") if spec.name == "mops" else spec.name
            if gate not in ("mops", "attempt"):
                raise UserError(f"--gate-init server: --method {self.method} has no gate to pretrain "
                                "(expected a mops or attempt gate)")
            if self.train_config().gate_pretrain_steps < 1:
                raise UserError("--gate-init server pretrains the gate on the server: expected --gate-pretrain-steps "
                                "of 1 or more")
        if self.score_split not in SCORE_SPLITS:
            raise UserError(f"--score-split {self.score_split!r}: expected one of {', '.join(SCORE_SPLITS)}")
        if not 1 <= self.required_clients <= self.n_clients:
            raise UserError(f"--min-clients {self.min_clients}: expected 1 to {self.n_clients} (the number of clients)")
        if not self.round_timeout > 0:
            raise UserError(f"--round-timeout {self.round_timeout}: expected a positive number of seconds")
        if self.train_config().mixed_precision == "fp16":
            # float16 needs a loss scaler that would have to live across rounds on every client
            raise UserError("--mixed-precision fp16: federated clients train in float32 or bf16 (no, bf16, auto)")
        if self.train_config().distill:
            raise UserError(f"--distill {self.train_config().distill}: federated clients do not distill (each would "
                            "need the dense model beside the pruned one); drop it")
        if self.test_examples < 0:
            raise UserError(f"--test-examples {self.test_examples}: expected 0 or more")

    def _validate_proximal(self) -> None:
        if self.proximal not in PROXIMAL_FORMS:
            raise UserError(f"--proximal {self.proximal!r}: expected one of {', '.join(PROXIMAL_FORMS)}")
        if self.proximal != "loss" and self.strategy != "fedprox":
            raise UserError(f"--proximal {self.proximal}: only FedProx pulls toward the global weights; "
                            "add --strategy fedprox")
        if self.proximal == "decoupled":  # and so FedProx (above)
            tc = self.train_config()
            rate = tc.lora_lr if self.is_lora else max(tc.lr, tc.gate_lr)  # the rates of what the method trains
            if self.proximal_mu * rate > 1:
                raise UserError(f"--proximal-mu {self.proximal_mu}: the decoupled pull moves lr x mu of the way back "
                                f"each step, at most all of it; with a learning rate of {rate:g} expected mu <= "
                                f"{1 / rate:g}")

    def _validate_server_optimiser(self) -> None:
        allowed = SERVER_DEFAULTS.get(self.strategy, {})
        for name, flag in SERVER_FLAGS.items():
            if getattr(self, name) is not None and name not in allowed:
                owners = " or ".join(s for s, keys in SERVER_DEFAULTS.items() if name in keys)
                raise UserError(f"{flag}: --strategy {self.strategy} has no such setting; use --strategy {owners}")
        s = self.server_settings()
        if "server_lr" in s and not s["server_lr"] > 0:
            raise UserError(f"--server-lr {s['server_lr']}: expected a positive server learning rate")
        if not 0 <= s.get("server_momentum", 0) < 1:
            raise UserError(f"--server-momentum {s['server_momentum']}: expected a momentum in [0, 1)")
        for name in ("beta1", "beta2"):
            if not 0 <= s.get(name, 0) < 1:
                raise UserError(f"--server-betas {s['beta1']} {s['beta2']}: expected each in [0, 1)")
        if not s.get("tau", 1) > 0:
            raise UserError(f"--server-tau {s['tau']}: expected a positive adaptivity (FedAdam's tau)")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FederatedConfig:
        return cls(**json.loads(text))

    def fingerprint(self) -> dict:
        """What fixes a run's trajectory: a checkpoint resumes only under the same values
        (``rounds`` may grow; timeouts, validation cadence and what is scored at the end may change)."""
        d = asdict(self)
        for k in ("rounds", "round_timeout", "test_examples", "device", "eval_every_rounds", "score_split",
                  "score_base"):
            d.pop(k)
        d["train"] = {k: v for k, v in d["train"].items()
                      if k not in ("steps", "eval_every", "eval_examples", "checkpoint_every")}
        return d
