"""Which versions of each model to serve, as Triton's version policy says."""

from __future__ import annotations

from dataclasses import dataclass

from service.inference.repository_layout import VERSION


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to serve, as Triton's: the latest N, all, or specific ones."""

    kind: str
    count: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """`latest`, `latest:N`, `all` or `specific:1,3`."""
        kind, _, argument = text.partition(":")
        if kind == "all" and not argument:
            return cls("all")
        usage = f"version policy {text!r}: use latest, latest:N, all or specific:1,3"
        numbers = argument.split(",") if argument else []
        if not all(VERSION.fullmatch(number) for number in numbers):
            raise ValueError(f"{usage} (versions and N are positive integers)")
        if kind == "latest" and len(numbers) <= 1:
            return cls("latest", count=int(argument) if argument else 1)
        if kind == "specific" and numbers:
            return cls("specific", versions=tuple(int(v) for v in numbers))
        raise ValueError(usage)

    def choose(self, versions: list[int]) -> list[int]:
        ordered = sorted(versions)
        if self.kind == "all":
            return ordered
        if self.kind == "latest":
            return ordered[-self.count :]
        return [v for v in ordered if v in self.versions]
