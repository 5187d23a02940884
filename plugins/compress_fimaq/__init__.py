"""FIMA-Q: block reconstruction with a Fisher-information loss, for weight and activation quantization."""

from compress import hookimpl
from compress_fimaq.method import Fimaq

compress_api = ">=2,<3"


@hookimpl
def compress_register_methods(register):
    register(Fimaq)
