"""`paws finetune`: SimCLRv2-style fine-tuning (or a frozen-backbone linear probe) of a pretrained encoder.

Modules: ``model`` (backbone + kept projection layer + zero-initialised classifier), ``data`` (the train /
held-out split, batches and evaluation), ``setup`` (everything before the first step: a ``FinetuneRun``, resume),
``train`` (the loop: one epoch at a time, selection on held-out data, checkpoints, Ctrl-C),
``results`` (result record and table) and ``command`` (the CLI entry point).
"""
