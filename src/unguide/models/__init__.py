"""Models: one loader for every model (:func:`load_model`) and the bundle of components the rest of unguide works
with; worlds (the embedded toy model) plug in through :mod:`unguide.models.worlds`."""
from .loading import DEFAULT_MODEL, ModelBundle, load_model

__all__ = ["DEFAULT_MODEL", "ModelBundle", "load_model"]
