"""``python -m tests._node_publish_fails merge ...``: the command line, with every rank but 0
failing to move its node's own part into place (as a read-only or vanished disk would make it
fail after rank 0 has published)."""

from __future__ import annotations

import errno
import os
import sys

from ckptavg.cli import main
from ckptavg.io import writer

_real = writer.publish_folder


def _publish(tmp, dest, mode):
    if os.environ.get("RANK") != "0":
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    return _real(tmp, dest, mode)


writer.publish_folder = _publish  # where a rank's part is published
main(sys.argv[1:])
