"""The MoR model: layers, routers, the model module and the dense reference forward."""

from morserve.model.mor import MoRModel
from morserve.model.reference import ReferenceOutput, reference_forward

__all__ = ["MoRModel", "ReferenceOutput", "reference_forward"]
