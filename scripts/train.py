"""Command-line trainer: ``python scripts/train.py --help`` (see rewardtune/trainers/cli.py)."""
import atexit
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    try:
        # the pack's folder may have any name: import it as ``rewardtune`` through a symlink
        pkgs = tempfile.mkdtemp(prefix="rewardtune-")
        atexit.register(shutil.rmtree, pkgs, True)
        os.symlink(ROOT, os.path.join(pkgs, "rewardtune"))
        sys.path.insert(0, pkgs)
        from rewardtune.trainers.cli import main
    except KeyboardInterrupt:  # Ctrl-C this early: no traceback either (cli.main handles the rest)
        print("\ninterrupted before training started: nothing was trained or changed", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
