"""OpenAI `stop` strings on streamed text: cut at the first match, never emit the stop string itself.

Text that might be the beginning of a stop string is held back until the next delta decides it, so streamed and
non-streamed answers end at the same character.
"""
from __future__ import annotations


class StopFilter:
    """Feed it text deltas; it returns what is safe to send and whether a stop string was hit."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.matched = False

    def feed(self, text: str) -> str:
        """The part of `held + text` that can be sent now; after a match, always ""."""
        if self.matched:
            return ""
        if not self.stops:
            return text
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.matched, self._held = True, ""
            return buffer[:min(hits)]
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        """Held-back text at the end of generation (it turned out not to be a stop string)."""
        held, self._held = self._held, ""
        return "" if self.matched else held

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best
