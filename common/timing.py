"""Stage timings with the names both front ends report (`--bench`, JSON `timings_ms`)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

STAGES: tuple[str, ...] = (
    "vision.prepare_inputs",
    "vision.compute_embeddings",
    "prompt.render",
    "prompt.build_tokens",
    "decode.prefill",
    "decode.iterative",
    "decode.generate",
)


@dataclass
class Timings:
    """Accumulates wall time per stage in milliseconds, with a call count for averages.

    `sync` is called before each clock read so asynchronous devices (CUDA, MLX) are measured honestly.
    """

    sync: Callable[[], None] = lambda: None
    total_ms: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, stage: str, ms: float, count: int = 1) -> None:
        self.total_ms[stage] = self.total_ms.get(stage, 0.0) + ms
        self.counts[stage] = self.counts.get(stage, 0) + count

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.add(stage, (time.perf_counter() - start) * 1000.0)

    def as_dict(self) -> dict[str, float]:
        """Total ms per stage, in the canonical order (stages never entered are 0.0)."""
        return {name: round(self.total_ms.get(name, 0.0), 3) for name in STAGES} | {
            k: round(v, 3) for k, v in self.total_ms.items() if k not in STAGES}

    def table(self) -> str:
        """The `--bench` table: stage, calls, total ms, average ms."""
        lines = [f"{'stage':<28}{'calls':>7}{'total ms':>12}{'avg ms':>10}"]
        for name in [*STAGES, *[k for k in self.total_ms if k not in STAGES]]:
            total, count = self.total_ms.get(name, 0.0), self.counts.get(name, 0)
            avg = total / count if count else 0.0
            lines.append(f"{name:<28}{count:>7}{total:>12.1f}{avg:>10.2f}")
        return "\n".join(lines)


class LoopClock:
    """Wall time spent inside the loop, excluding the time the consumer holds a yielded token."""

    def __init__(self) -> None:
        self.total = 0.0
        self._since: float | None = time.perf_counter()
        self._lap = 0.0

    def pause(self) -> None:
        if self._since is not None:
            self.total += time.perf_counter() - self._since
            self._since = None

    def resume(self) -> None:
        self._since = time.perf_counter()

    def lap(self) -> float:
        """Milliseconds of loop time since the previous lap."""
        now = self.total + (time.perf_counter() - self._since if self._since is not None else 0.0)
        elapsed, self._lap = now - self._lap, now
        return elapsed * 1000.0
