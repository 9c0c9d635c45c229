"""Fine-tuning: LoRA and freezing, the classification head, and the fine-tuning job the training loop runs.

In: a trained run. Out: new run folders that load like any other. `lmforge.finetune(...)` (lmforge.api)
is the entry point.
"""
