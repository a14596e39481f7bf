"""Dispatch: Assignment -> send layout -> all-to-all -> expert inputs, and back."""

from .dispatcher import Dispatcher
from .layout import SendLayout, plan_send

__all__ = ["Dispatcher", "SendLayout", "plan_send"]
