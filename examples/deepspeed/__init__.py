"""DeepSpeed recipe: the DeepSeek-V3-style MoE model trained by DeepSpeed with deepep_plugin (see README.md)."""
