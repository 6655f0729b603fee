"""Accuracy of every config on a fresh SynthVQA split, with a heat map beside the JSON.

    python scripts/eval_vlm.py --model tiny --seed 7 --n 2000 --out reports/tiny_eval_seed7.json

The logic lives in `diagnostics/eval_vlm.py`; `--help` lists the options.
"""

import sys

from diagnostics.eval_vlm import main

if __name__ == "__main__":
    sys.exit(main())
