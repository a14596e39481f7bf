"""Hugging Face interchange: export to stock transformers classes (export.py), import a
Hugging Face folder into a run (load.py), both through one checked bijection of tensors
(conversion.py) built from the configs by each class's entry in arch.FAMILIES; and export to a
remote-code folder with moe-train's own modeling file (remote.py, modeling_moe_train.py: torch
and transformers only) for the routers and bodies no stock class holds."""

from .arch import FAMILIES, HFExportError, choose
from .conversion import Conversion, ConversionError, Ref

__all__ = ["FAMILIES", "Conversion", "ConversionError", "HFExportError", "Ref", "choose"]
