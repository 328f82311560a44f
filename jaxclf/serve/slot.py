"""What the service serves right now, as one object a request reads once: the model slot.

A slot holds one or more *arms*, each a model version with its InferenceEngine, its drift monitor
and a share of the traffic (A/B serving). A request leases the current slot, picks an arm by its
key and runs on that arm's engine; a reload builds a whole new slot beside the old one (loading
and compiling every bucket of any new version), swaps it in with one assignment, and closes the
old slot's engines only once every request that leased it has finished.

Where models come from is a *source*: a model directory, or references into a model registry
(`sentiment@production`), resolved again at every reload so a moved alias is picked up.

Traffic split: a request with a key (any string: a user id, a session) goes to the arm whose
cumulative-weight interval holds sha256(key) mapped into [0, 1), so the same key always lands on
the same version while the split is unchanged; a request without a key is assigned at random.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

from jaxclf.config import ConfigError
from jaxclf.serve.monitoring import DriftMonitor

if TYPE_CHECKING:  # the engine loads JAX; the command line parses --ab before that
    from jaxclf.serve.engine import InferenceEngine


@dataclasses.dataclass(frozen=True)
class Target:
    """One model version to serve, as resolved from a source."""

    version: str  # reported as model_version: NAME@vN from a registry, else a content hash
    path: Path  # the model directory to load
    weight: float  # share of the traffic; the weights of a slot sum to 1
    # What was configured, as clients may see it: a registry reference such as sentiment@production, or the
    # model directory's name (never its path: the public endpoints and /metrics show this).
    ref: str


class ModelSource(Protocol):
    def resolve(self) -> list[Target]:
        """What to serve now (may raise with a message the operator can act on)."""

    def describe(self) -> str:
        """One line for logs and error messages."""


class DirectorySource:
    """A model directory; its version is `version` or the content hash of its weights and config."""

    def __init__(self, path: str | os.PathLike, version: str | None = None):
        self.path, self.version = Path(path), version

    def resolve(self) -> list[Target]:
        from jaxclf.serve.engine import model_version
        return [Target(self.version or model_version(self.path), self.path, 1.0, self.path.name)]

    def describe(self) -> str:
        return str(self.path)


class RegistrySource:
    """References into a registry (NAME@ALIAS or NAME@vN) with traffic weights, checked by hash at resolve."""

    def __init__(self, root: str | os.PathLike, refs: Sequence[tuple[str, float]]):
        from jaxclf.registry import Ref, Registry
        if not refs:
            raise ConfigError("a registry source needs at least one model reference")
        for ref, _ in refs:
            Ref.parse(ref)  # fail on a malformed reference now, not at the first reload
        self.registry = Registry(root, create=False, read_only=True)  # a server never writes the registry
        self.refs = normalise_weights(refs)

    def resolve(self) -> list[Target]:
        targets = []
        for ref, weight in self.refs:
            version = self.registry.checked(ref)
            targets.append(Target(version.ref, version.path, weight, ref))
        return targets

    def describe(self) -> str:
        return ", ".join(f"{ref}={w:g}" for ref, w in self.refs) + f" from the registry at {self.registry.root}"


def normalise_weights(refs: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    weights = [w for _, w in refs]
    if any(not (isinstance(w, (int, float)) and w > 0 and w == w and w != float("inf")) for w in weights):
        raise ConfigError(f"traffic weights must be positive numbers, got {weights}")
    total = float(sum(weights))
    return [(ref, w / total) for ref, w in refs]


def parse_split(spec: str) -> list[tuple[str, float]]:
    """'a@production=0.9,a@staging=0.1' -> [('a@production', 0.9), ('a@staging', 0.1)] (weights normalised)."""
    out = []
    for part in spec.split(","):
        ref, sep, weight = part.strip().rpartition("=")
        try:
            value = float(weight)
        except ValueError:
            value = None
        if not sep or not ref or value is None:
            raise ConfigError(f"cannot read {part.strip()!r} in the traffic split {spec!r}: write NAME@ALIAS=WEIGHT,"
                             f"NAME@ALIAS=WEIGHT, e.g. sentiment@production=0.9,sentiment@staging=0.1")
        out.append((ref, value))
    if len({ref for ref, _ in out}) != len(out):
        raise ConfigError(f"the traffic split {spec!r} names a reference twice")
    return normalise_weights(out)


def key_point(key: str) -> float:
    """A stable point in [0, 1) for a request key (the first 64 bits of its sha256)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


class TrafficSplit:
    """Maps a request key (or chance, without one) to an arm index in proportion to the weights."""

    def __init__(self, weights: Sequence[float]):
        total = float(sum(weights))
        if not weights or total <= 0 or any(w < 0 for w in weights):
            raise ValueError(f"traffic weights must be non-negative with a positive sum, got {list(weights)}")
        self.weights = [w / total for w in weights]
        self._edges, acc = [], 0.0
        for w in self.weights:
            acc += w
            self._edges.append(acc)

    def choose(self, key: str | None = None) -> int:
        point = key_point(key) if key is not None else random.random()
        for i, edge in enumerate(self._edges):
            if point < edge:
                return i
        return len(self._edges) - 1  # rounding left the last edge a hair under 1


@dataclasses.dataclass(frozen=True)
class Arm:
    """One model version being served."""

    target: Target
    engine: InferenceEngine
    monitor: DriftMonitor | None  # None when its metrics.json records no reference distributions


class ModelSlot:
    """The arms being served together and their split; counts the requests that hold it."""

    def __init__(self, arms: Sequence[Arm]):
        if not arms:
            raise ValueError("a model slot needs at least one arm")
        self.arms = tuple(arms)
        self.split = TrafficSplit([a.target.weight for a in self.arms])
        self._in_flight = 0
        self._idle = threading.Condition()

    @property
    def primary(self) -> Arm:
        """The arm with the largest share (the first of equals): what single-model endpoints describe."""
        return max(self.arms, key=lambda a: a.target.weight)

    @property
    def engines(self) -> list[InferenceEngine]:
        """Distinct engines (two arms may serve the same version)."""
        seen: dict[int, InferenceEngine] = {}
        for arm in self.arms:
            seen.setdefault(id(arm.engine), arm.engine)
        return list(seen.values())

    @property
    def versions(self) -> list[str]:
        return [a.target.version for a in self.arms]

    def signature(self) -> list[tuple[str, float]]:
        """What a reload compares: the versions and their weights."""
        return [(a.target.version, a.target.weight) for a in self.arms]

    def describe(self) -> list[dict]:
        return [{"model_version": a.target.version, "ref": a.target.ref, "weight": a.target.weight}
                for a in self.arms]

    def pick(self, key: str | None = None) -> Arm:
        return self.arms[self.split.choose(key)] if len(self.arms) > 1 else self.arms[0]

    # --- lease counting: the service increments under its swap lock, so a retired slot gains none --

    def enter(self) -> None:
        with self._idle:
            self._in_flight += 1

    def exit(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    @property
    def in_flight(self) -> int:
        with self._idle:
            return self._in_flight

    def wait_idle(self, timeout: float) -> bool:
        """True once no request holds this slot; False if some still do after `timeout` seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)
