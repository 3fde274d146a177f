"""TextStream (services.decoder.engine.textstream.py) with the tiny checkpoint's real byte-level BPE tokenizer.

Streaming detokenisation must never send half a character, must add up to
exactly what a full `tokenizer.decode` gives, and must cut stop strings out
without ever sending a piece of one, even when a stop string spans tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.decoder.engine.textstream import REPLACEMENT, TextStream

MULTIBYTE = "Café crème, déjà vu: 中文字符 and emoji 😀🎉 then naïve ü — fin. 日本語のテキスト 🚀"


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def run(tokenizer: Any, ids: list[int], stop: list[str] | None = None) -> tuple[list[str], str, TextStream]:
    """Push every id (until the stream stops); return the deltas, what finish() returned, and the stream."""
    stream = TextStream(tokenizer, stop or [])
    deltas = []
    for token in ids:
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    return deltas, stream.finish(), stream


def splits_a_character(tokenizer: Any, ids: list[int]) -> bool:
    """True if some token boundary of `ids` falls inside a multibyte character."""
    return any(decode(tokenizer, ids[:k]).endswith(REPLACEMENT) for k in range(1, len(ids)))


# --- whole characters only, and nothing lost ---------------------------------------


def test_multibyte_text_token_by_token_never_sends_half_a_character(tokenizer: Any) -> None:
    ids = encode(tokenizer, MULTIBYTE)
    assert decode(tokenizer, ids) == MULTIBYTE
    assert splits_a_character(tokenizer, ids), "no token boundary inside a character: the test could not fail"

    stream = TextStream(tokenizer, [])
    sent = ""
    for k, token in enumerate(ids, start=1):
        delta = stream.push(token)
        assert REPLACEMENT not in delta, f"delta {delta!r} after token {k} holds part of a character"
        sent += delta
        assert MULTIBYTE.startswith(sent), f"after token {k} the stream sent {sent!r}, not a prefix of the text"
    assert sent + stream.finish() == MULTIBYTE
    assert sent == MULTIBYTE, "text was held back although every character was complete"


def test_every_prefix_of_the_token_sequence_adds_up_to_the_full_decode(tokenizer: Any) -> None:
    """Cut anywhere, even inside a character: deltas + finish() == decode(ids) (U+FFFD only where decode has it)."""
    ids = encode(tokenizer, MULTIBYTE)
    cut_inside = [k for k in range(1, len(ids)) if decode(tokenizer, ids[:k]).endswith(REPLACEMENT)]
    assert cut_inside
    for k in range(1, len(ids) + 1):
        want = decode(tokenizer, ids[:k])
        deltas, tail, _ = run(tokenizer, ids[:k])
        assert "".join(deltas) + tail == want, f"cut after {k} tokens"
        assert all(REPLACEMENT not in d for d in deltas), "a partial character was sent before the end"
    # a cut inside a character decodes to U+FFFD, which only finish() may send
    _, tail, _ = run(tokenizer, ids[: cut_inside[0]])
    assert tail.endswith(REPLACEMENT)


def test_broken_bytes_in_the_middle_are_sent_as_decode_shows_them(tokenizer: Any) -> None:
    """A dangling lead byte followed by ordinary text: the U+FFFD goes out where decode puts it, nothing is stuck."""
    han = encode(tokenizer, "中")
    first_piece = next(k for k in range(1, len(han) + 1) if decode(tokenizer, han[:k]).endswith(REPLACEMENT))
    ids = han[:first_piece] + encode(tokenizer, " and then plain words follow here")
    want = decode(tokenizer, ids)
    assert REPLACEMENT in want and not want.endswith(REPLACEMENT)
    deltas, tail, _ = run(tokenizer, ids)
    assert "".join(deltas) + tail == want
    assert "".join(deltas) == want, "ordinary text after the broken bytes was held back"


def test_special_tokens_are_skipped_like_decode_does(tokenizer: Any) -> None:
    ids = [*encode(tokenizer, "Hello"), tokenizer.convert_tokens_to_ids("<|im_end|>"), *encode(tokenizer, " world")]
    deltas, tail, _ = run(tokenizer, ids)
    assert "".join(deltas) + tail == decode(tokenizer, ids) == "Hello world"


# --- stop strings ----------------------------------------------------------------------


def token_span(tokenizer: Any, ids: list[int], start: int, end: int) -> int:
    """How many tokens of `ids` the characters [start, end) of the decoded text touch."""
    touched = 0
    for k in range(len(ids)):
        before, upto = len(decode(tokenizer, ids[:k])), len(decode(tokenizer, ids[: k + 1]))
        if upto > start and before < end:
            touched += 1
    return touched


def test_stop_string_spanning_several_tokens_is_cut_out_and_never_partly_sent(tokenizer: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog and keeps running."
    stop = "fox jumps over"
    ids = encode(tokenizer, text)
    at = text.index(stop)
    assert token_span(tokenizer, ids, at, at + len(stop)) > 1, "the stop string fits one token: the test could not fail"

    stream = TextStream(tokenizer, [stop])
    sent = ""
    for token in ids:
        sent += stream.push(token)
        assert text[:at].startswith(sent), f"sent {sent!r}: more than the text before the stop string"
        if stream.stopped:
            break
    assert stream.stopped
    assert sent + stream.finish() == "The quick brown "
    assert stream.push(encode(tokenizer, " more")[0]) == "" and stream.finish() == ""


def test_stop_detected_on_the_token_that_completes_it(tokenizer: Any) -> None:
    text = "alpha beta gamma delta epsilon"
    ids = encode(tokenizer, text)
    stream = TextStream(tokenizer, ["gamma"])
    for k, token in enumerate(ids, start=1):
        stream.push(token)
        complete = "gamma" in decode(tokenizer, ids[:k])
        assert stream.stopped == complete, f"after token {k}"
        if complete:
            break
    assert stream.stopped


def test_earliest_of_several_stop_strings_wins(tokenizer: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    deltas, tail, stream = run(tokenizer, encode(tokenizer, text), ["lazy", "brown", "zebra"])
    assert stream.stopped and "".join(deltas) + tail == "The quick "


def test_stop_string_at_the_very_start_returns_nothing(tokenizer: Any) -> None:
    ids = encode(tokenizer, "STOP here, then a lot more text")
    deltas, tail, stream = run(tokenizer, ids, ["STOP"])
    assert stream.stopped
    assert deltas and all(d == "" for d in deltas) and tail == ""


def test_multibyte_stop_string(tokenizer: Any) -> None:
    text = "prices in 日本 are 中文字符 high, 😀 ok"
    ids = encode(tokenizer, text)
    for stop, before in (("中文", "prices in 日本 are "), ("😀", "prices in 日本 are 中文字符 high, ")):
        stream = TextStream(tokenizer, [stop])
        sent = ""
        for token in ids:
            delta = stream.push(token)
            assert REPLACEMENT not in delta
            sent += delta
            if stream.stopped:
                break
        assert stream.stopped and sent + stream.finish() == before, stop


def test_a_false_start_of_a_stop_string_is_released(tokenizer: Any) -> None:
    """Text that only looks like the start of a stop string is held, then sent once it is not one."""
    text = "fox fax fox jumps high"
    deltas, tail, stream = run(tokenizer, encode(tokenizer, text), ["fox jumps"])
    assert stream.stopped and "".join(deltas) + tail == "fox fax "


def test_held_prefix_of_a_stop_string_is_flushed_at_the_end(tokenizer: Any) -> None:
    """The sequence ends (EOS or length) while holding what could have been a stop string: finish() sends it."""
    text = "hello there fo"
    deltas, tail, stream = run(tokenizer, encode(tokenizer, text), ["fox"])
    assert not stream.stopped
    assert "".join(deltas) + tail == text
    assert not "".join(deltas).endswith("fo"), "a possible stop-string start was sent before it was decided"


def test_no_stop_string_in_text_sends_everything(tokenizer: Any) -> None:
    ids = encode(tokenizer, MULTIBYTE)
    deltas, tail, stream = run(tokenizer, ids, ["never-there", "nor this"])
    assert not stream.stopped and "".join(deltas) + tail == MULTIBYTE
