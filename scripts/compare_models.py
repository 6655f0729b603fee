"""Compare VLM checkpoints on a few configs of one fresh SynthVQA split (quicker than eval_vlm's every config).

    python scripts/compare_models.py --seed 7 --n 400 --models runs/my_vlm/model tiny --out reports/compare_models.json

The logic lives in `diagnostics/compare_models.py`; `--help` lists the options.
"""

from diagnostics.compare_models import main

if __name__ == "__main__":
    main()
