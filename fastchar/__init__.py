"""fastchar: fast recurrent character models for PyTorch.

Fused LSTM, GRU and RNN kernels (a C++ CPU extension and Triton GPU kernels)
behind drop-in replacements for torch.nn.LSTM/GRU/RNN (``fastchar.nn``), the
functional ops (``fastchar.ops``), and a plain-PyTorch reference
(``fastchar.reference``).
"""

__version__ = "0.1.0"
