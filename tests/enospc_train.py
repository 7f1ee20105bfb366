"""train.py on a disk that fills up: `python tests/enospc_train.py FILE STEP train.py ARGS...`.

Writing the file named FILE inside the checkpoint of step STEP fails with ENOSPC ("No space left
on device"), as a full disk would; everything else is the real program. Orbax writes that file
(a JSON item's) through `epath.Path.write_text`, which is what fails here.
"""

import errno
import os
import runpy
import sys

from etils import epath

FILE, STEP = sys.argv[1], sys.argv[2]
_write_text = epath.Path.write_text


def _write_text_or_fail(self, *args, **kwargs):
    parts = str(self).split(os.sep)
    if self.name == FILE and any(p == STEP or p.startswith(f"{STEP}.") for p in parts):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return _write_text(self, *args, **kwargs)


epath.Path.write_text = _write_text_or_fail
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
