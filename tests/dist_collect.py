"""`neuroproj-prune ARGS` that records every statistics-file write (rank and path) in $NPP_SAVE_LOG.

Launched by tests/test_stats.py under `accelerate launch` to check that the file is written exactly once.
"""
import os
import sys

from neuroproj_prune import cli, stats

_save = stats.Stats.save


def _logged_save(self, path):
    with open(os.environ["NPP_SAVE_LOG"], "a") as f:
        f.write(f"{os.environ.get('RANK', '0')} {path}\n")
    return _save(self, path)


stats.Stats.save = _logged_save

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
