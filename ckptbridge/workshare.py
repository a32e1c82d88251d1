"""Splitting one conversion's output across workers by whole files.

Each output format is planned from shapes alone (which data files exist, how many tensor bytes each
holds, which files each planned tensor's bytes land in), so every worker computes the same plan and
takes its share without talking to the others: whole files, so no two processes ever write one file
and each file's bytes equal those a single process writes. The split is by bytes, largest file first
onto the least loaded worker (deterministic: ties go to the lower rank, files in name order).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class FilePlan:
    """An output's data files (paths relative to the folder the writer fills) and what goes where."""

    sizes: dict[str, int]  # data file -> tensor bytes it holds
    files_of: dict[str, frozenset[str]]  # planned tensor (MCore name) -> the data files holding its bytes

    def tensors_for(self, files: Collection[str]) -> set[str]:
        """The planned tensors a worker writing ``files`` must read."""
        return {name for name, where in self.files_of.items() if not where.isdisjoint(files)}


def assign(sizes: Mapping[str, int], workers: int) -> list[frozenset[str]]:
    """Per worker, the files it writes: greedy by bytes (largest first onto the least loaded worker)."""
    loads = [0] * workers
    shares: list[set[str]] = [set() for _ in range(workers)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        w = min(range(workers), key=lambda i: (loads[i], i))
        shares[w].add(name)
        loads[w] += sizes[name]
    return [frozenset(s) for s in shares]


def loads(sizes: Mapping[str, int], shares: list[frozenset[str]]) -> list[int]:
    """Tensor bytes per worker for an `assign` result."""
    return [sum(sizes[n] for n in share) for share in shares]
