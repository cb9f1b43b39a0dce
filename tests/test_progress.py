"""Progress bars: to stderr, labelled with what they count, shown when stderr is not a terminal."""

from __future__ import annotations

from pipeline.progress import progress


def test_bar_goes_to_stderr_off_a_terminal_with_its_label(capsys):
    assert list(progress(range(3), "quantize: decoder blocks", "block")) == [0, 1, 2]
    captured = capsys.readouterr()  # pytest's capture is not a TTY: the bar is still shown
    assert captured.out == ""
    assert "quantize: decoder blocks" in captured.err and "3/3" in captured.err and "block" in captured.err
