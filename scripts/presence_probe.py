"""What the answer position of a presence question knows, layer by layer: linear probes.

    python scripts/presence_probe.py --model tiny --seed 11 --n 480 --out reports/presence_probe_tiny_seed11.md

The logic lives in `diagnostics/presence_probe.py`; `--help` lists the options.
"""

import sys

from diagnostics.presence_probe import main

if __name__ == "__main__":
    sys.exit(main())
