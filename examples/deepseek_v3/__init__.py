"""A DeepSeek-V3-style MoE model and its plain-PyTorch expert-parallel training recipe over deepep_plugin.

``python -m examples.deepseek_v3.train --preset tiny`` trains it on 2 CPU processes in about a minute; see
``examples/README.md``.
"""
