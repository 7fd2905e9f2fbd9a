"""systemd entry point: settings -> AutoBackfillScheduler -> run forever (`run` command)."""

import sys

from polygon_backfill.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
