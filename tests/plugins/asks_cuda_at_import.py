"""A plugin written the way people write them: it asks torch.cuda.is_available() at import
(which, asked through the driver, poisons fork), and its mechanism reports the float32
policy it runs under: its forward raises where TF32 is allowed."""

import torch
import torch.nn as nn

from attnbench import AttentionBase, register_attention

HAS_CUDA = torch.cuda.is_available()


@register_attention("tf32_probe", "a linear map that raises where TF32 is allowed (a test's probe)", [])
class TF32Probe(AttentionBase):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32:
            raise RuntimeError("TF32 is on in this case's process")
        return self.proj(x)
