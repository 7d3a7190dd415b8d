"""Glue shared by the thin rule scripts: logging to the rule's log and to the terminal, and
turning a QuantdiffError into one clear line and a failed job (Snakemake then removes outputs)."""
import contextlib
import faulthandler
import sys
import time

from .errors import QuantdiffError


class StageLog:
    """Writes each line to the rule's log file and to stderr, so the user sees progress live."""

    def __init__(self, path):
        self.file = open(path, "a", encoding="utf-8") if path else None

    def __call__(self, *parts):
        line = " ".join(str(p) for p in parts)
        stamped = f"[{time.strftime('%H:%M:%S')}] {line}"
        print(stamped, file=sys.stderr, flush=True)
        if self.file:
            print(stamped, file=self.file, flush=True)

    def close(self):
        if self.file:
            self.file.close()


@contextlib.contextmanager
def stage(snakemake):
    """`with stage(snakemake) as log:` in every rule script."""
    log = StageLog(snakemake.log[0] if len(snakemake.log) else None)
    log(f"rule {snakemake.rule} {dict(snakemake.wildcards)}")
    # A crash in native code (an AOTInductor package segfaulted on load on an H100: docs/PERF.md)
    # leaves its kind and Python frames in the rule's log rather than nothing.
    faulthandler.enable(file=log.file or sys.stderr)
    try:
        yield log
    except QuantdiffError as err:
        log(f"ERROR: {err}")
        sys.exit(1)
    finally:
        faulthandler.disable()
        log.close()
