"""Stop strings matched on decoded text at any position, with the right text withheld."""

from sagellm.engine.detokenizer import StopMatcher


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[str, str | None]:
    out = []
    for piece in pieces:
        text, stop = matcher.feed(piece)
        out.append(text)
        if stop is not None:
            return "".join(out), stop
    out.append(matcher.flush())
    return "".join(out), None


def test_no_stops_passes_text_through():
    assert feed_all(StopMatcher(()), ["a", "b", "c"]) == ("abc", None)


def test_stop_inside_a_token_is_cut():
    assert feed_all(StopMatcher(("END",)), ["Hello wor", "ld!EN", "D more"]) == ("Hello world!", "END")


def test_stop_split_across_tokens_is_withheld_then_cut():
    m = StopMatcher(("###",))
    assert m.feed("abc#") == ("abc", None)  # "#" might start a stop: withheld
    assert m.feed("#") == ("", None)
    assert m.feed("#tail") == ("", "###")


def test_withheld_text_is_released_when_it_cannot_match():
    m = StopMatcher(("stop",))
    assert m.feed("st") == ("", None)
    assert m.feed("ar") == ("star", None)
    assert m.flush() == ""


def test_earliest_of_several_stops_wins():
    assert feed_all(StopMatcher(("world", "lo w")), ["hello world"]) == ("hel", "lo w")


def test_flush_returns_a_pending_prefix_at_the_end():
    m = StopMatcher(("abc",))
    assert m.feed("xab") == ("x", None)
    assert m.flush() == "ab"
