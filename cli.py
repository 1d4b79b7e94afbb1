"""How every script ends on an error: the user's mistake prints one line and exits 2; a bug prints its traceback.

An error is the user's when tcod's own code raised it on purpose, with a message written to be read: a `raise`
statement in a file of this repository, of a type that says what is wrong with the input or the machine (a bad value,
a file or directory, a model that cannot be had, not enough memory or disk); and, wherever it is raised, an OSError
of the machine's state (a full disk or quota, a read-only filesystem, a permission denied). The checks that raise these run before
any model loads. Everything else (an error raised inside torch or transformers, a TypeError or KeyError in our code,
a failed assert) is a bug, and its traceback is what a bug report needs. TCOD_TRACEBACK=1 shows the traceback of
every error.

    if __name__ == "__main__":
        cli.run(lambda: main(tyro.cli(Args)))
"""

from __future__ import annotations

import errno
import linecache
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
USER_ERROR_EXIT = 2  # as argparse (and tyro) exit on a malformed flag
# the types tcod raises for input it refuses and for a machine that cannot run it (memory.py: MemoryError)
USER_ERROR_TYPES = (ValueError, OSError, RuntimeError, ImportError, MemoryError)
# what the system says of the machine, wherever it is raised: a full disk or quota, a read-only filesystem, no permission
MACHINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def raised_on_purpose(e: BaseException) -> bool:
    """True when a `raise` statement in this repository's own code raised e (not a builtin or a library under it)."""
    if isinstance(e, OSError) and e.errno in MACHINE_ERRNOS:
        return True  # not a bug: the machine's state, named by the system's message and the file
    if not isinstance(e, USER_ERROR_TYPES) or e.__traceback__ is None:
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = tb.tb_frame.f_code.co_filename
    if os.path.dirname(os.path.abspath(path)) != HERE:
        return False
    return linecache.getline(path, tb.tb_lineno).lstrip().startswith("raise")


def message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and len(e.args) >= 2:  # OSError(errno, text): the text, not "[Errno 28] ..."
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return str(e) or type(e).__name__


def run(main) -> None:
    """Call main(); a user error ends the process with its one-line message and exit status 2."""
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C, or a scheduler's SIGINT: not a bug; what was saved is said by the script's docs
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if not raised_on_purpose(e) or os.environ.get("TCOD_TRACEBACK"):
            raise
        print(f"error: {message(e)}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
