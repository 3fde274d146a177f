"""Token ids -> text deltas that are whole characters, with stop strings cut out.

Byte-level BPE tokens can end in the middle of a multibyte character; such
text is held back until the character is complete. Text that might be the
start of a stop string is held back too, so a stop string is never sent,
even partially; when one appears the text before it is sent and the
sequence ends.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class TextStream:
    """Incremental detokenizer for one sequence."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # decoded text of `ids` up to the last clean boundary
        self.sent = 0  # characters of `text` already returned
        self._prefix = 0  # token offsets of the decode window (see `push`)
        self._read = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add a token; return the text that can be sent now ('' if none)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """End of sequence: flush everything left (incomplete bytes decode as U+FFFD, like a full decode)."""
        if not self.stopped:
            tail = self._decode(self.ids[self._prefix :])
            before = self._decode(self.ids[self._prefix : self._read])
            self.text += tail[len(before) :]
            self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self.stopped:
            return ""
        if self.stop:
            start = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.stopped = True
                out = self.text[self.sent : cut]
                self.text = self.text[:cut]
                self.sent = cut
                return out
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out
