"""What a spawned worker runs first (through runpy.run_path, so the parent's module names do not matter).

Inside ComfyUI this package is imported under the custom-node folder's name, which a fresh process
cannot import. This file puts the folder that holds `wanvideo` first on sys.path, imports the
worker code under its own name, and calls it with the arguments the parent left in
WAN_WORKER_ARGS. Nothing else of the parent (its __main__, other custom nodes) is imported.
"""
import time

_entered_at = time.time()  # the end of the 'spawn' phase and the start of 'imports' (workers.py)

import os  # noqa: E402
import sys  # noqa: E402

_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if _root in sys.path:
    sys.path.remove(_root)
sys.path.insert(0, _root)  # first, so no other `wanvideo` on the path (another custom node's) shadows ours

from wanvideo.parallel.distributed.workers import worker_main  # noqa: E402

worker_main(*WAN_WORKER_ARGS, entered_at=_entered_at)  # noqa: F821 - set by runpy.run_path(init_globals=...)
