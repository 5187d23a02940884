"""Static activation scales: calibrated input quantization for W8A8 checkpoints."""

from compress import hookimpl
from compress_activations.method import ActivationScales

compress_api = ">=2,<3"


@hookimpl
def compress_register_methods(register):
    register(ActivationScales)
