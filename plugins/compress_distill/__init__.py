"""Knowledge distillation on the shared training loop."""

from compress import hookimpl
from compress_distill.method import Distill

compress_api = ">=2,<3"


@hookimpl
def compress_register_methods(register):
    register(Distill)
