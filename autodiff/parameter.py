"""Parameters: named, trainable pieces of prompt text."""

from __future__ import annotations

from dataclasses import dataclass, field

from autodiff.errors import ConfigError
from autodiff.records import ParameterSpec

KINDS = ("instruction", "output_format", "examples", "other")


@dataclass(frozen=True)
class Version:
    step: int
    value: str
    proposal_id: str | None = None


@dataclass(eq=False)
class Parameter:
    """One piece of prompt text. `role` tells the backward and optimizer LLMs what it is for.
    `must_keep` lists substrings any new value must still contain (its role would be lost
    without them, e.g. the answer marker an output parser looks for)."""

    name: str
    value: str
    role: str
    kind: str = "instruction"
    trainable: bool = True
    must_keep: tuple[str, ...] = ()
    node: str | None = None
    peers: list[str] = field(default_factory=list)
    history: list[Version] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"parameter {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.name or not self.name.replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"parameter name {self.name!r} must be letters, digits, '_' or '.'")
        if not self.history:
            self.history.append(Version(0, self.value))

    def update(self, value: str, step: int, proposal_id: str | None = None) -> None:
        """Only an accepted proposal (or a person) calls this; the optimizer never does."""
        self.value = value
        self.history.append(Version(step, value, proposal_id))

    def spec(self, position: int) -> ParameterSpec:
        """What a run stores of this parameter (its values are stored as versions), at `position`
        in the pipeline's order."""
        return ParameterSpec(name=self.name, node=self.node, kind=self.kind, role=self.role, trainable=self.trainable,
                             peers=tuple(self.peers), position=position)
