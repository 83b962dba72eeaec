"""What every command line shares: logging, one-line errors, and summary lines that more than one
command prints (kept here so the commands never import each other)."""

from __future__ import annotations

import contextlib
import io
import logging
import sys

from mops.errors import UserError


def setup_logging(quiet: bool) -> None:
    """INFO logs and progress bars, or (quiet) only warnings and the final summary."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if quiet:
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_warning()
        datasets.disable_progress_bars()


@contextlib.contextmanager
def stderr_kept_aside(quiet: bool, shown: int = 4000):
    """Libraries that draw progress bars no option turns off (lm-eval, llm-compressor): a quiet
    run keeps their stderr aside and shows its last ``shown`` characters only if the block fails."""
    if not quiet:
        yield
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue()[-shown:])
        raise


def run_cli(main, argv=None) -> int:
    """Run ``main(argv)``; a UserError becomes one line on stderr and exit code 2."""
    prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "mops"
    try:
        main(argv)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


def held_out_line(t: dict) -> str:
    """The held-out line both the centralized and the federated ``mops-recover`` summaries end with."""
    return (f"  held-out test response ppl ({t['examples']} examples): base {t['base']['ppl']:.2f} -> "
            f"with adapter {t['adapter']['ppl']:.2f}")
