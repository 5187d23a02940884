"""Round-to-nearest weight quantization, the baseline every quantizer is compared with."""

from compress import hookimpl
from compress_rtn.method import RoundToNearest


@hookimpl
def compress_register_methods(register):
    register(RoundToNearest)
