"""What every command line shares: a quiet run's library chatter is kept aside and shown
only when the block fails."""

import sys

import pytest

from mops.cli_common import stderr_kept_aside


def test_a_quiet_block_that_succeeds_shows_nothing(capsys):
    with stderr_kept_aside(quiet=True):
        print("progress 50%", file=sys.stderr)
    assert capsys.readouterr().err == ""


def test_a_quiet_block_that_fails_shows_the_tail_of_what_it_kept(capsys):
    with pytest.raises(RuntimeError, match="boom"):
        with stderr_kept_aside(quiet=True, shown=12):
            print("early chatter", file=sys.stderr)
            print("last words", file=sys.stderr)
            raise RuntimeError("boom")
    assert capsys.readouterr().err == "\nlast words\n"  # its last 12 characters


def test_a_block_that_is_not_quiet_writes_through(capsys):
    with stderr_kept_aside(quiet=False):
        print("progress 50%", file=sys.stderr)
    assert capsys.readouterr().err == "progress 50%\n"
