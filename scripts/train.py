"""Command-line trainer: ``python scripts/train.py --help`` (see rewardtune/trainers/cli.py)."""
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    try:
        # the pack's folder may have any name: import it as ``rewardtune``
        runpy.run_path(os.path.join(ROOT, "testing", "pack_import.py"))["import_pack"]()
        from rewardtune.trainers.cli import main
    except KeyboardInterrupt:  # Ctrl-C this early: no traceback either (cli.main handles the rest)
        print("\ninterrupted before training started: nothing was trained or changed", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
