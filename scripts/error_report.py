"""Which wrong answers a VLM gives, per question family and config, on a fresh SynthVQA split.

    python scripts/error_report.py --model tiny --seed 9 --n 1000 --out reports/errors_tiny_seed9.json

The logic lives in `diagnostics/error_report.py`; `--help` lists the options.
"""

from diagnostics.error_report import main

if __name__ == "__main__":
    main()
