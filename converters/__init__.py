"""Host-side conversion: Keras / SavedModel to a validated int8 TFLite model package.

Imports TensorFlow (lazily, inside functions that need it); never starts a broker or an agent.
"""

from __future__ import annotations

__all__ = ["RECIPES", "convert_model"]

from converters.convert import RECIPES, convert_model
