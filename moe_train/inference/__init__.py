"""A trained run on one process: generate, evaluate, export (and load the export back).

    run.py       load_run: a run folder's config, newest checkpoint (any ep x dp layout) in a
                 1-process model, and tokenizer (what the tools below start from)
    generate.py  generate (KV-cache decoding), sample_next; `moe-train-generate`
    evaluate.py  score: loss, perplexity, bits per byte, expert load; `moe-train-eval`
    export.py    export_model (model.safetensors + config.json), from_pretrained; `moe-train-export`
    cli.py       the arguments the three tools share (RUN_DIR, --checkpoint, --device)
    hf/          Hugging Face in and out: `moe-train-export --format hf`, `model.init_from=DIR`
                 (one checked bijection of tensors per stock class; docs/HF.md)

`moe_train.generate` and `moe_train.from_pretrained` are these modules' functions. The package
imports no training code; the tools import `run.py` (the trainer's config, checkpoints) only when
they run.
"""

from .export import export_model, from_pretrained, load_pretrained_tokenizer
from .generate import sample_next

__all__ = ["export_model", "from_pretrained", "load_pretrained_tokenizer", "sample_next"]
