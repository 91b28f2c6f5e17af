"""The training pipeline that makes models steerable: data loaders, recipes (sft, dpo, apm, annotate, acsft), CLI.

    steerserve train dpo --config training/recipes/dpo-tiny.yaml --output runs/dpo-tiny
"""
