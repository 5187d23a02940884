"""Allocation under an exact budget: RCO (Riemannian constrained optimization) and EvoPress."""

from compress import hookimpl
from compress_rco.evopress import EvoPress
from compress_rco.rco import RCO

compress_api = ">=2,<3"


@hookimpl
def compress_register_methods(register):
    register(RCO)
    register(EvoPress)
