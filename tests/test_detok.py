"""worker/engine/detok.py: stable incremental text and stop strings."""

from worker.engine.detok import Detokenizer


def byte_decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def feed(d, data: bytes) -> str:
    return "".join(d.push(b) for b in data)


def test_multibyte_characters_are_emitted_whole():
    d = Detokenizer(byte_decode)
    out = [d.push(b) for b in "héllo €".encode()]
    assert "".join(out) == "héllo €"
    assert all("\ufffd" not in o for o in out)


def test_stop_string_cuts_the_text_and_is_never_streamed():
    d = Detokenizer(byte_decode, stop=["STOP"])
    streamed = feed(d, b"abc STO")
    assert "STO" not in streamed
    streamed += feed(d, b"P and more")
    assert d.stopped and d.text == "abc " and streamed + d.flush() == "abc "


def test_held_back_text_is_released_when_no_stop_matches():
    d = Detokenizer(byte_decode, stop=["XYZ"])
    streamed = feed(d, b"hello XY")
    assert streamed == "hello "
    streamed += feed(d, b"Q!")
    assert not d.stopped and streamed + d.flush() == "hello XYQ!"
