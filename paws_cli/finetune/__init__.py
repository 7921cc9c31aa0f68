"""`paws finetune`: SimCLRv2-style fine-tuning (or a frozen-backbone linear probe) of a pretrained encoder.

Modules: ``model`` (backbone + kept projection layer + zero-initialised classifier), ``data`` (the train /
held-out split, batches and evaluation), ``train`` (the loop: selection on held-out data, resume),
``results`` (result record and table) and ``command`` (the CLI entry point).
"""
