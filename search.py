"""Run a qlnas search: `python search.py --space FILE [--out DIR] [--resume] [--address ADDR]`.

On a cluster: `ray submit cluster/config.yaml search.py -- --space search_spaces/...yaml`
(the cluster's set-up installs qlnas on every node; this script only parses and calls it).
"""

import sys

from qlnas.cli import main

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
