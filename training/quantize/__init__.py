"""Quantize a checkpoint into a servable variant, with measured quality against its 16-bit source.

    steerserve quantize default --precision nf4 --output runs/smollm2-nf4

One module per method family (``cast``, ``bnb``, ``gptq``, ``compressed``, ``gguf``),
picked from :data:`steerserve.training.quantize.methods.QUANTIZERS`; ``quality``
measures perplexity and MCQ accuracy; ``cli`` writes the output and its manifest.
"""
