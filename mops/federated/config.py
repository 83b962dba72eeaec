"""Everything a federated run needs, in one dataclass that travels as JSON.

The server sends it to every client inside each message's ``ConfigRecord`` (key
``mops-federated``), so a ClientApp needs nothing but the message: the same apps run in
Flower's simulation engine and as SuperNodes behind a real SuperLink.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from mops.errors import UserError
from mops.federated.partition import SCHEMES
from mops.mixture import MixtureConfig
from mops.train import TrainConfig

STRATEGIES = ("fedavg", "fedprox")
CONFIG_KEY = "mops-federated"


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
    min_clients: int | None = None  # None: more than half of the clients
    round_timeout: float = 3600.0  # seconds the server waits for a round's replies
    mixture: dict = field(default_factory=lambda: asdict(MixtureConfig()))
    train: dict = field(default_factory=lambda: asdict(TrainConfig()))  # lr, gate_lr, batch_size, ... of each client
    test_examples: int = 160
    device: str = "cpu"

    @property
    def seed(self) -> int:
        return self.train["seed"]

    @property
    def required_clients(self) -> int:
        return self.min_clients if self.min_clients is not None else self.n_clients // 2 + 1

    def mixture_config(self) -> MixtureConfig:
        return MixtureConfig(**self.mixture)

    def train_config(self) -> TrainConfig:
        known = {f.name for f in fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in self.train.items() if k in known})

    def validate(self) -> None:
        self.train_config().validate()
        for name, flag in (("n_clients", "--federated"), ("rounds", "--rounds"), ("local_steps", "--local-steps")):
            if getattr(self, name) < 1:
                raise UserError(f"{flag} {getattr(self, name)}: expected a positive whole number")
        if self.partition not in SCHEMES:
            raise UserError(f"--partition {self.partition!r}: expected one of {', '.join(SCHEMES)}")
        if self.strategy not in STRATEGIES:
            raise UserError(f"--strategy {self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if self.strategy == "fedprox" and not self.proximal_mu > 0:
            raise UserError(f"--proximal-mu {self.proximal_mu}: FedProx needs a positive proximal weight")
        if not 1 <= self.required_clients <= self.n_clients:
            raise UserError(f"--min-clients {self.min_clients}: expected 1 to {self.n_clients} (the number of clients)")
        if not self.round_timeout > 0:
            raise UserError(f"--round-timeout {self.round_timeout}: expected a positive number of seconds")
        if self.train.get("mixed_precision", "no") != "no":
            raise UserError("--mixed-precision: federated clients train in float32 only; drop the option")
        if self.test_examples < 0:
            raise UserError(f"--test-examples {self.test_examples}: expected 0 or more")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FederatedConfig:
        return cls(**json.loads(text))

    def fingerprint(self) -> dict:
        """What fixes a run's trajectory: a checkpoint resumes only under the same values
        (``rounds`` may grow, timeouts and the test-set size may change)."""
        d = asdict(self)
        for k in ("rounds", "round_timeout", "test_examples", "device"):
            d.pop(k)
        d["train"] = {k: v for k, v in d["train"].items() if k not in ("steps", "eval_every", "checkpoint_every")}
        return d
