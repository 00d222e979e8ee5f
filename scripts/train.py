"""Command-line trainer: ``python scripts/train.py --help`` (see rewardtune/trainers/cli.py)."""
import atexit
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    # the pack's folder may have any name: import it as ``rewardtune`` through a symlink
    pkgs = tempfile.mkdtemp(prefix="rewardtune-")
    atexit.register(shutil.rmtree, pkgs, True)
    os.symlink(ROOT, os.path.join(pkgs, "rewardtune"))
    sys.path.insert(0, pkgs)
    from rewardtune.trainers.cli import main
    sys.exit(main())
