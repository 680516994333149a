"""Checkpoint conversion: HF GPT-2 directories into modformer models, vanilla -> MoM."""
