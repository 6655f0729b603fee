"""Does the model read the question at the answer position? Residual RMS and spread per family.

    python scripts/answer_state.py --model tiny [--checkpoint runs/RUN/checkpoint.pt] --n 16 --tier medium

The logic lives in `diagnostics/answer_state.py`; `--help` lists the options.
"""

from diagnostics.answer_state import main

if __name__ == "__main__":
    main()
