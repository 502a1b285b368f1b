"""The token vocabulary of a sequence: codebook tokens first, then the special tokens.

A field's sequence is [SOS, CLASS_c or NO_CLASS, t_1 … t_L] with every t_i in [0, n_codes).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Vocab:
    n_codes: int
    n_classes: int

    @property
    def sos(self) -> int:
        return self.n_codes

    @property
    def no_class(self) -> int:
        return self.n_codes + 1

    def class_token(self, c: int) -> int:
        return self.n_codes + 2 + c

    @property
    def size(self) -> int:
        return self.n_codes + 2 + self.n_classes
