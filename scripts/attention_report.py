"""Where the answer position looks: one head's attention mass on the objects a question is about.

    python scripts/attention_report.py --model tiny --layer 2 --head 1 --seed 9 --n 300 \\
        --out reports/attention_tiny_seed9.md

The logic lives in `diagnostics/attention_report.py`; `--help` lists the options.
"""

import sys

from diagnostics.attention_report import main

if __name__ == "__main__":
    sys.exit(main())
