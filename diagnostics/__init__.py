"""Reports on a trained VLM: accuracy per config, wrong answers, where a head looks, what a position knows.

Each module holds a report's logic and its command line (`main(argv)`); `scripts/<name>.py` runs it.

- `eval_vlm`: accuracy of every config on a fresh SynthVQA split, and a heat map
- `compare_models`: several models on a few configs that span the knob space
- `error_report`: how each family's answers go wrong (confusions, signed errors, yes-bias)
- `attention_report`: one head's attention mass on the objects a question is about
- `presence_probe`: linear probes of the answer position, layer by layer
- `answer_state`: the answer position's residual RMS and spread per family
"""
